"""What the task front ends share: the scaffold (options, engine start, results, final table), the evaluation loop, metrics, embeddings."""
