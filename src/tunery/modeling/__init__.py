"""Where Tunery computes part of a model's forward itself: packed attention over examples laid end to
end (`attention.py`), the LM head and cross-entropy only at supervised positions (`forward.py`), and
the shape buckets that keep bf16 on a CPU from growing without bound (`shapes.py`). The objectives
and the training loop use them; tests/test_packing.py and tests/test_architectures.py hold each one
equal to the model's reference forward on every supported architecture."""
