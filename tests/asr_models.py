"""Tiny speech recognizers of both kinds, random-init from config objects, with locally built processors.

- ``save_tiny_wav2vec2_ctc``: a waveform CTC model (wav2vec2, per-frame LayerNorm, so padded
  batches are masked) with a ``Wav2Vec2CTCTokenizer`` over a few characters;
- ``save_tiny_whisper``: a sequence-to-sequence model (Whisper, 80 mel bins over 3 s windows) with
  a byte-level BPE tokenizer trained here and Whisper's special tokens;
- ``edit_distance``: Levenshtein by dynamic programming, the reference CER/WER are checked against.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHARACTERS = list("abdegijkmnopstuwxy")
WHISPER_SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]


def save_tiny_wav2vec2_ctc(
    save_dir: Path, characters=CHARACTERS, seed: int = 0, blank_bias: float = 0.0
) -> Path:
    """A tiny Wav2Vec2ForCTC; ``blank_bias`` added to the blank's logit (large: every frame blank,
    every transcript empty)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC, Wav2Vec2Processor

    from lightning_modules.asr_ctc import ctc_tokenizer

    tokenizer = ctc_tokenizer(characters)
    config = Wav2Vec2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32),
        conv_kernel=(400, 3),
        conv_stride=(160, 2),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
    )
    torch.manual_seed(seed)
    model = Wav2Vec2ForCTC(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # random logits far from ties: greedy paths vary along the clip
        model.lm_head.bias[tokenizer.pad_token_id] += blank_bias
    model.save_pretrained(save_dir)
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(save_dir)
    return save_dir


def whisper_tokenizer(texts):
    """A byte-level BPE tokenizer trained on ``texts``, as Whisper's, with its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import WhisperTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=WHISPER_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    special = "<|endoftext|>"
    return WhisperTokenizerFast(
        tokenizer_object=bpe, unk_token=special, bos_token=special, eos_token=special, pad_token=special
    )


def save_tiny_whisper(
    save_dir: Path, texts=("gajaamoo judu xibee busep", "suwaaw teteyaap"), seed: int = 0
) -> Path:
    """A tiny WhisperForConditionalGeneration over 3-second windows (80 mel bins)."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tokenizer = whisper_tokenizer(list(texts) * 10)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=3)
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=extractor.nb_max_frames // 2,
        max_target_positions=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=start,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
        max_length=24,
    )
    model.save_pretrained(save_dir)
    WhisperProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(save_dir)
    return save_dir


def edit_distance(hypothesis: list, reference: list) -> int:
    """Levenshtein distance by dynamic programming (insertions, deletions, substitutions cost 1)."""
    previous = list(range(len(reference) + 1))
    for i, h in enumerate(hypothesis, start=1):
        current = [i]
        for j, r in enumerate(reference, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (h != r)))
        previous = current
    return previous[-1]
