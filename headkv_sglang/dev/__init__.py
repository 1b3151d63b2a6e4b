"""Developer tooling, not the product: the test model fetch, the server harness, haystacks, the demo."""
