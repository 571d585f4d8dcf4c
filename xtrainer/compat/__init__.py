"""transformers' Trainer surface that is not the training loop.

The Trainer keeps thin methods with transformers' names and signatures; the work is done here:

| module              | what it owns                                                                  |
| ------------------- | ----------------------------------------------------------------------------- |
| `metrics_report`    | `metrics_format`, `log_metrics` (the printed table), `save_metrics` (*_results.json) |
| `memory_metrics`    | `skip_memory_metrics=False`: the `*_mem_*` metrics of init/train/eval/test    |
| `flos`              | parameter counts, `floating_point_ops`, the `total_flos` accumulator          |
| `run_logs`          | the "***** Running ... *****" banners, resume argument checks, log visibility |
| `model_card`        | the README.md model card (`create_model_card`)                                |
| `hub`               | `init_hf_repo`, `push_to_hub`, `hub_strategy` pushes (huggingface_hub client) |
| `accelerate_compat` | `accelerator`, `end`, `get_cp/sp/tp_size`: accelerate's place, and why        |
"""
