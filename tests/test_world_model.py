"""The world model's pieces that do not need a trained model (issue 4 in progress)."""

import random

from dac_core import world as W
from dac_core import world_model as M


def test_every_world_word_is_one_token_and_captions_fit():
    tok = M.world_tokenizer()
    for word in M.WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    rng = random.Random(0)
    longest = max((W.caption(W.random_scene(rng, 3)) for _ in range(200)), key=len)
    ids = tok(longest).input_ids
    assert len(ids) < 40  # far inside CLIP's 77
    assert tok.unk_token_id not in ids[1:-1]  # (CLIP uses <|endoftext|> as unk and eos)


def test_pipeline_shapes():
    pipe = M.build_pipeline(0)
    assert pipe.vae_scale_factor == 2  # 64x64 pixels <-> 32x32 latents
    image = pipe("a small red circle on the left on a white background", num_inference_steps=1, height=W.SIZE,
                 width=W.SIZE, output_type="np").images
    assert image.shape == (1, W.SIZE, W.SIZE, 3)
