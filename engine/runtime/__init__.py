"""The model runtime: config, the tensor-parallel VLMo, parallel layers, collectives, process groups, shard loading."""
