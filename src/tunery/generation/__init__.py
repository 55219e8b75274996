"""Generation: the one decode loop, shared by evaluation, GRPO, RLAIF, data synthesis and the server.

    sequence.py  GenerationParams, GenerationResult; one sequence's sampler, stop strings,
                 incremental detokenization and logprobs (every serving engine uses these)
    generate.py  decode_steps, generate_batch, stream, chat_prompt   (the decode loop over the KV cache)
    skinny.py    decode-step linear layers on a CPU (`W·xᵀ`)
    engine.py    Engine: loaded bases + LRU of adapters, one batching worker (server, `tunery chat`)
    loading.py   load_for_inference: a base plus an optional trained model/adapter directory

Nothing is imported here, so `import tunery.generation` stays cheap for the CLI.
"""
