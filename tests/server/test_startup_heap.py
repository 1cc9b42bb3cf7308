"""A server freezes the heap it started with, so the cyclic GC never pauses serving to walk it."""
import gc


def test_a_started_server_has_frozen_its_startup_heap(start_server, chat_model_dir):
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    start_server(chat_model_dir)
    # torch, transformers and the model hold hundreds of thousands of objects; all of them are now out of reach of
    # a full collection (which walked them with the GIL held: 100-250 ms on this machine).
    assert gc.get_freeze_count() > 100_000
