"""Checkpoints of a run: names and metadata (`layout`, the leaf), saving, loading and pruning tags
(`checkpointing`), disk space (`space`), resharding through DeepSpeed's universal format
(`universal`), resume planning (`resume`), the run's position (`progress`), the composed
`RunCheckpointer` the Trainer is handed (`run_checkpointer`), and the fp32 export (`export`).
Never imports `dwnet.engine`."""
