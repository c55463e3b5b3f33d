"""Laptop-size models of the real architectures, random-init, and a tokenizer trained on a corpus.

Saved as ordinary Hugging Face folders, so they load by ``from_pretrained`` exactly as a hub
checkpoint does. The demo builds its assets with these (``datamodules/demo/assets.py``), and so does
``python -m datamodules.own_corpus`` from a user's own training pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# Special tokens mirror Qwen3-Embedding: the end-of-text token pads and closes every input,
# so last-token pooling reads the same position as it does on the real model.
END_OF_TEXT = "<|endoftext|>"
DEMO_VOCAB_SIZE = 2048


def instruction_texts(prompts=None) -> Iterator[str]:
    """Every task's instruction as a query starts (``PromptConfig``'s, the paper's by default), for a
    tokenizer's training texts: a prompt then costs a few tokens, not one per byte."""
    from datamodules.text_batches import PromptConfig

    prompts = prompts or PromptConfig()
    for task in prompts.prompts:
        yield prompts.format_query("", task)


def train_tokenizer(texts, save_dir: Path, vocab_size: int = DEMO_VOCAB_SIZE) -> None:
    """Trains a byte-level BPE tokenizer (Qwen's scheme, at laptop size) and saves it HF-style.

    Byte-level: any text encodes (an unseen character costs its UTF-8 bytes); ``vocab_size``
    is an upper bound, a small corpus may run out of merges first.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos_id = tokenizer.token_to_id(END_OF_TEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {END_OF_TEXT}",
        pair=f"$A {END_OF_TEXT} $B {END_OF_TEXT}",
        special_tokens=[(END_OF_TEXT, eos_id)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT, padding_side="left"
    )
    wrapped.save_pretrained(save_dir)


def tiny_text_model_config(vocab_size: int, hidden_size: int = 256, num_layers: int = 2):
    """A Qwen3 decoder of the real architecture, small enough to train on a laptop CPU."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


def save_tiny_text_model(
    save_dir: Path, tokenizer_source: Path, hidden_size: int = 256, num_layers: int = 2, seed: int = 0
) -> None:
    """Random-init tiny Qwen3 + the given tokenizer, saved as a from_pretrained-able folder."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(seed)
    model = AutoModel.from_config(tiny_text_model_config(len(tokenizer), hidden_size, num_layers))
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)


def tiny_w2v_bert_config(hidden_size: int = 128, num_layers: int = 2):
    """A w2v-BERT 2.0 (conformer over 80-bin filterbanks, 50 frames per second) at demo size.

    The demo's speech tower, random-init and frozen. Why not a tiny HuBERT: a random waveform
    encoder samples its filters' oscillating outputs once per frame, so its states carry little
    spectral information; a word classifier trained on them reached 0.18 held-out F1 where the
    same classifier on this model's random states reached 0.83 (600 steps each). A filterbank
    input carries the spectrum a pre-trained encoder would have learned to extract.
    """
    from transformers import Wav2Vec2BertConfig

    return Wav2Vec2BertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        feature_projection_input_dim=160,  # 80 mel bins, two frames stacked
        conv_depthwise_kernel_size=15,
        add_adapter=False,
        mask_time_prob=0.0,
        layerdrop=0.0,
    )


def save_tiny_w2v_bert(save_dir: Path, hidden_size: int = 128, num_layers: int = 2, seed: int = 0) -> None:
    """Random-init tiny w2v-BERT + its filterbank feature extractor (16 kHz)."""
    import torch
    from transformers import AutoModel, SeamlessM4TFeatureExtractor

    torch.manual_seed(seed)
    AutoModel.from_config(tiny_w2v_bert_config(hidden_size, num_layers)).save_pretrained(save_dir)
    SeamlessM4TFeatureExtractor(sampling_rate=16000, return_attention_mask=True).save_pretrained(save_dir)


def tiny_hubert_config(hidden_size: int = 128, num_layers: int = 2):
    """A HuBERT of the real recipe's architecture at test size: 50 frames per second of 16 kHz audio.

    The waveform encoder uses per-frame LayerNorm (as HuBERT-large), so batches run padded; its
    first convolution spans 25 ms and two convolutions keep it cheap with the same 320x
    downsampling as HuBERT.
    """
    from transformers import HubertConfig

    return HubertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        conv_dim=(64, 64),
        conv_kernel=(400, 3),
        conv_stride=(160, 2),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=32,
        num_conv_pos_embedding_groups=4,
        mask_time_prob=0.0,
    )


def save_tiny_hubert(
    save_dir: Path, hidden_size: int = 128, num_layers: int = 2, seed: int = 0, **overrides
) -> None:
    """Random-init tiny HuBERT + its waveform feature extractor (16 kHz, per-clip normalization)."""
    import torch
    from transformers import AutoModel, Wav2Vec2FeatureExtractor

    config = tiny_hubert_config(hidden_size, num_layers)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(save_dir)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    ).save_pretrained(save_dir)


def save_tiny_ctc_asr(
    save_dir: Path,
    vocabulary: list[str],
    feature_extractor_source: Path,
    hidden_size: int = 64,
    seed: int = 0,
) -> None:
    """Random-init tiny w2v-BERT CTC recognizer over ``vocabulary`` + its processor (the feature
    extractor of ``feature_extractor_source``, a filterbank one): a stand-in for the demo's trained ASR."""
    import torch
    from transformers import AutoFeatureExtractor, Wav2Vec2BertForCTC, Wav2Vec2BertProcessor

    from lightning_modules.asr_ctc import ctc_tokenizer

    tokenizer = ctc_tokenizer(vocabulary)
    config = tiny_w2v_bert_config(hidden_size, num_layers=1)
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    torch.manual_seed(seed)
    Wav2Vec2BertForCTC(config).save_pretrained(save_dir)
    extractor = AutoFeatureExtractor.from_pretrained(feature_extractor_source)
    Wav2Vec2BertProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(save_dir)
