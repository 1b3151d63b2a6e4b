"""The default of every policy hyperparameter, defined once.

The policy classes use these as their field defaults, which are also the defaults of
the server's ``--kv-*`` flags (declared on those fields, ``policies/params.py``), so a
policy built by hand and one built by the server agree. Where a value differs from the paper's, the paper's is given beside it;
the values here are the ones measured best on this project's benchmarks (docs/policies-and-profiles.md, docs/benchmarks-and-results.md).

No torch here: ``config.py`` reads this module at import time.
"""

from __future__ import annotations

#: Pooling kinds of the observation-window score smoothing (``--kv-pooling`` choices).
POOLINGS: tuple[str, ...] = ("maxpool", "avgpool")
#: How the query heads of a KV head's group are combined.
GQA_AGGREGATIONS: tuple[str, ...] = ("mean", "max")

#: Observation window of a policy built by hand. The server's window is automatic
#: (``KVPolicyConfig.obs_window``: ``min(32, budget // 4)``) because it depends on the budget.
WINDOW_SIZE = 8
#: Width of the score pooling (7 in the SnapKV, PyramidKV, AdaKV and HeadKV scripts).
KERNEL_SIZE = 13
POOLING = "maxpool"
#: How far the score pooling window is moved to the past, at most ``KERNEL_SIZE // 2`` (0:
#: centred, as in every SnapKV-family script). A shift of 3 (a token inherits the attention of
#: the 9 tokens before it, so a needle's number is kept with its key words) found 19/24 answers
#: where centred pooling found 16/24 for headkv at 5% on calibration cases the fidelity grid does
#: not use (benchmarks/results/pool_shift_calibration.md), but on the needle grid's first 25
#: cases it lost 11 of 400 answers over headkv, snapkv, adakv and pyramidkv at 1-10% (headkv
#: +1, the others -3 to -6; benchmarks/results/pool_shift_needles_cpu.md): it stays opt-in.
POOL_SHIFT = 0
GQA_AGG = "mean"
#: HeadKV's pool size ``base // beta`` (1.005: the first value of the HeadKV sweep, and the
#: best mean of 1.005 / 1.5 / 2 / 5 on 24 calibration cases the fidelity grid does not use, with
#: question scoring: 0.17 / 0.67 of the answers at 2% / 5%, the others 0.08-0.17 / 0.42-0.58;
#: benchmarks/results/beta_calibration.md).
HEADKV_BETA = 1.005
#: HeadKV's score exponent (1 in every published run).
HEADKV_TEMP = 1.0
#: PyramidKV's steepness (20 in the PyramidKV code and kvpress).
PYRAMID_BETA = 20.0
#: Ada-KV's safeguard fraction (0.2 in kvpress and the paper's GQA experiments).
FLOOR_ALPHA = 0.2
#: Attention sinks of StreamingLLM and RazorAttention (4 in both papers).
SINK_SIZE = 4
#: RazorAttention: share of heads kept whole, as the paper: the top 1% by echo score and
#: the top 14% by induction score (``--kv-razor-fraction`` = their sum).
RAZOR_ECHO_FRACTION = 0.01
RAZOR_INDUCTION_FRACTION = 0.14
RAZOR_FRACTION = 0.15  # not 0.01 + 0.14, which is 0.15000000000000002 in floating point
#: How RazorAttention picks its retrieval heads: a fixed fraction of the heads (the
#: paper's 15%), or as many as the budget pays for (held KV <= L * H * budget).
RAZOR_HEADS: tuple[str, ...] = ("fraction", "budget")
#: D2O: merge each dropped token into its most similar kept token: "on" (the paper's weights,
#: a softmax of the similarities with the kept token's own similarity 1), "mean" (the authors'
#: code: ``(k_j + sum s_i k_i) / (1 + n_j)``, prompt only) or not ("off").
D2O_MERGES: tuple[str, ...] = ("on", "mean", "off")
#: "off": on the test model's needle cases merging lost every answer at 5% and 10% with either
#: weighting (benchmarks/results/d2o_settings_cpu.md).
D2O_MERGE = "off"
#: D2O: how the layers share the budget: "request" (the paper's ``softmax(-variance)`` with each
#: request's own attention variances, layer by layer), "profile" (the same with the variances of
#: the ``d2o`` profile) or "uniform" (every layer the same, as SnapKV).
D2O_LAYER_CHOICES: tuple[str, ...] = ("request", "profile", "uniform")
#: "uniform": on the test model's needle cases the density allocation moves budget away from the
#: deep layers that retrieve, and lost answers at 5% (benchmarks/results/d2o_settings_cpu.md).
D2O_LAYERS = "uniform"
#: D2O's attention sinks (its own setting, ``--kv-d2o-sink-size``; the D2O reference keeps 4).
#: 0: with it D2O's defaults keep SnapKV's tokens; on the test model's needle cases the 4 sinks
#: lost answers at 5% (benchmarks/results/d2o_settings_cpu.md, d2o_sinks_cpu.md;
#: docs/policies-and-profiles.md says why).
D2O_SINK_SIZE = 0
#: PoD: target share of the (layer, KV head) rows that reuse a lower layer's distant keys
#: (or scores) and store no distant keys (at most ``(G - 1) / G`` of the rows above layer 0
#: with groups of ``G`` layers).
#: 0.1: on the test model's 15 needle cases it kept 100% of full KV's score without token
#: selection, where 0.3 kept 80% (benchmarks/results/fidelity_pod*_cpu.md).
POD_SHARE = 0.1
#: PoD: most layers in one sharing group of a KV head (the first stores the distant keys, the
#: others read them); 2: pairs.
POD_GROUP = 2
#: PoD: 0 picks the rows by --kv-pod-share; > 0, every row at least this similar to the layer
#: below (the paper groups consecutive layers of similarity >= 0.5).
POD_THRESHOLD = 0.0
#: PoD: what a sharing row takes from its group's first layer for its distant tokens: "keys"
#: (the released PoD: its own queries against the group's keys) or "scores" (the first
#: version: the group's first layer's logits). "scores": without the paper's post-training
#: adaptation, key sharing lost the needles on the test model where score sharing kept them
#: (benchmarks/results/pod_keys*_curve_cpu.md vs pod_scores_curve_cpu.md).
POD_SHARINGS: tuple[str, ...] = ("keys", "scores")
POD_SHARING = "scores"
