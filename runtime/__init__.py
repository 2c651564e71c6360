"""The frozen-model runtime shared by serving (`server/`) and training (`training/`).

Loading and the dtype/device policy (`model_runner`), embedding prefix -> KV, the batch layout with prefill
and decode (`batch_state`, `kv_cache`, `attention_mask`), gist compression (`gist`). Neither `server/` nor
`training/` keeps forward code of its own; this package imports neither of them.
"""
