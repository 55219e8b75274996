"""One lock for every model construction in the process."""

import threading

# transformers builds a model inside context managers that swap process-wide functions
# (`PreTrainedModel.tie_weights`, `init_weights`, `torch.nn.init.*`) and put them back on exit. Two
# threads loading at once interleave the swaps and can leave them swapped for good: every later load
# then skips weight tying (a tied lm_head stays on the meta device) or initialisation, silently. The
# server loads in its engine thread while evaluation and export load in others, so every model
# construction in Tunery holds this lock (re-entrant: a load may build a PEFT wrapper inside it).
LOAD_LOCK = threading.RLock()
