"""Tiny random-weight text-to-image pipelines, built offline from config.

``build_demo_models(store)`` writes two diffusers pipeline folders into the
model store, so image generation can be run and tested without a model hub:

- ``demo-unet``: Stable-Diffusion style (CLIP text encoder, U-Net, DDIM);
- ``demo-dit``: PixArt-Sigma style (T5 text encoder, DiT transformer, DDIM).

Both use one small VAE (scale factor 8: a 64x64 image is an 8x8 latent): the
files in ``demo-dit/vae`` are hard links to those in ``demo-unet/vae``, so a
worker serving both loads it once (see ``models.components``). They generate
64x64 images in a fraction of a second on a CPU, and accept up to 512x512
(their ``hearth.yaml``). Their tokenizers are
trained here on a small built-in corpus; the trained vocabularies are put in a
canonical order, so every build writes the same files and, for the same seed,
the same pixels. The images are noise, not pictures: the weights are random.

torch, transformers and diffusers are imported only while building, so the
ids below can be imported cheaply.
"""

from __future__ import annotations

import json
import os
import shutil
import string
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from models import library_logs

DEMO_MODEL_IDS = ("demo-unet", "demo-dit")

_CORPUS = (
    "a photo of a cat sitting on a windowsill in the morning sun",
    "a painting of a lighthouse by the sea at dusk, oil on canvas",
    "a red fox running through fresh snow in a quiet forest",
    "an astronaut riding a horse on the moon, digital art",
    "a bowl of ramen with an egg, steam rising, studio lighting",
    "the quick brown fox jumps over the lazy dog",
    "a watercolor map of an old harbour town with small boats",
    "portrait of an old man with a grey beard, black and white photograph",
    "a futuristic city skyline at night with neon signs and rain",
    "a cozy cabin in the mountains with smoke from the chimney",
    "close-up of a dew drop on a green leaf, macro photography",
    "a cup of coffee next to an open book on a wooden table",
    "a herd of elephants walking across the savanna at sunset",
    "a small robot watering plants in a greenhouse",
    "an abstract pattern of blue and orange circles",
    "a dragon flying over a medieval castle, fantasy illustration",
    "a field of sunflowers under a clear blue sky",
    "a plate of fresh fruit: apples, pears, grapes and 3 lemons",
    "a sailing ship in a storm, dramatic waves, 18th century style",
)
_MAX_TOKENS = 77  # CLIP's position embeddings, as in Stable Diffusion
_T5_MAX_TOKENS = 300  # PixArt-Sigma's max_sequence_length
# CLIP's own pre-tokeniser split (transformers' CLIPTokenizer), used for training too.
_CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


def _clip_tokenizer() -> Any:
    """A byte-level BPE CLIP tokenizer trained on the corpus.

    Every byte character and its end-of-word form are passed as special tokens
    while training: they get ids in sorted order rather than in hash order, so
    ties between merges break the same way on every run, and any text, however
    unusual, falls back to byte tokens.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>", *alphabet, *(c + "</w>" for c in alphabet)]
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=1,
        special_tokens=specials,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    for token in specials:  # already there; kept as a guarantee for unseen text
        vocab.setdefault(token, len(vocab))
    # Pairs, as transformers' own loader passes them; the annotation (list[str]) is too narrow.
    merges: Any = [(left, right) for left, right in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_MAX_TOKENS)


def _t5_tokenizer() -> Any:
    """A Unigram T5 tokenizer (fast, no sentencepiece) trained on the corpus.

    The trainer's pieces are sorted by rounded score, then text, since their
    order varies between runs. Every printable ASCII character, alone and
    after "▁", is added at a low score, so ASCII text never becomes ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    unigram.train_from_iterator(_CORPUS, trainer)
    trained = json.loads(unigram.to_str())["model"]["vocab"]
    specials = [(str(piece), 0.0) for piece, _ in trained[:3]]
    pieces = sorted(
        ((str(piece), round(float(score), 6)) for piece, score in trained[3:]),
        key=lambda item: (-item[1], item[0]),
    )
    seen = {piece for piece, _ in pieces}
    low = round(min(score for _, score in pieces) - 1.0, 6)
    for char in string.printable.strip():
        for piece in (char, "▁" + char):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, low))
    return T5Tokenizer(vocab=specials + pieces, extra_ids=0, model_max_length=_T5_MAX_TOKENS)


def _vae() -> Any:
    """The shared VAE: four blocks, so a scale factor of 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(  # type: ignore[no-untyped-call]
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def _unet_pipeline() -> Any:
    """A Stable-Diffusion style pipeline: CLIP text encoder, U-Net, DDIM."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(  # type: ignore[no-untyped-call]
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _dit_pipeline() -> Any:
    """A PixArt-Sigma style pipeline: T5 text encoder, DiT transformer, DDIM.

    DDIM rather than DPM-Solver: the latter's ``set_timesteps`` raises a numpy
    DeprecationWarning (``__array__`` without ``copy``) with numpy 2.
    """
    import torch
    from diffusers import DDIMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(0)
    text_encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    transformer = PixArtTransformer2DModel(  # type: ignore[no-untyped-call]
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=32,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=32,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    scheduler = DDIMScheduler(  # type: ignore[no-untyped-call]
        beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False, steps_offset=1
    )
    return PixArtSigmaPipeline(  # type: ignore[no-untyped-call]
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(),
        transformer=transformer,
        scheduler=scheduler,
    )


_BUILDERS: dict[str, Callable[[], Any]] = {"demo-unet": _unet_pipeline, "demo-dit": _dit_pipeline}


LIMITS = "max_width: 512\nmax_height: 512\ndefault_steps: 20\n"


def _finish(folder: Path, store: Path, model_id: str) -> None:
    """Add the serving limits, and share the VAE files with demo-unet when it is there."""
    (folder / "hearth.yaml").write_text(LIMITS)
    shared_vae = store / DEMO_MODEL_IDS[0] / "vae"
    if model_id != DEMO_MODEL_IDS[0] and shared_vae.is_dir():
        shutil.rmtree(folder / "vae")
        (folder / "vae").mkdir()
        for source in shared_vae.iterdir():
            try:
                os.link(source, folder / "vae" / source.name)
            except OSError:  # another file system: a copy still works, unshared
                shutil.copy2(source, folder / "vae" / source.name)


def _write_atomically(
    build: Callable[[], Any], target: Path, *, overwrite: bool, finish: Callable[[Path], None]
) -> bool:
    """Build a pipeline into a hidden sibling folder, then rename it to ``target``.

    A crash leaves at most a dot-folder behind (the registry ignores those),
    never a half-written model. Returns False when ``target`` exists and is
    kept: it was there already, or another process wrote it meanwhile.
    """
    if target.exists() and not overwrite:
        return False
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = target.with_name(f".{target.name}.tmp-{tag}")
    retired = target.with_name(f".{target.name}.old-{tag}")
    try:
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        finish(staging)
        if target.exists():  # only when overwriting
            target.rename(retired)
        try:
            staging.rename(target)
        except OSError:
            if target.exists():  # another writer won the race; its folder is as good
                return False
            if retired.exists():  # put the old model back rather than lose it
                retired.rename(target)
            raise
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def build_demo_models(store: Path, *, overwrite: bool = False) -> list[Path]:
    """Write the demo pipelines into the model store ``store``.

    Each model becomes ``store/<id>`` (see ``DEMO_MODEL_IDS``), in diffusers'
    folder format, loadable with ``DiffusionPipeline.from_pretrained``.
    Existing folders are kept unless ``overwrite``. Returns the folders written.
    """
    library_logs.adopt("transformers", "diffusers")
    store.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for model_id in DEMO_MODEL_IDS:
        target = store / model_id
        finish = partial(_finish, store=store, model_id=model_id)
        if _write_atomically(_BUILDERS[model_id], target, overwrite=overwrite, finish=finish):
            written.append(target)
    return written
