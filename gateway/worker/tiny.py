"""Build tiny chat models locally, with no download: the demo model and test fixtures.

    python -m gateway.worker.tiny OUT_DIR [--train-steps N] [--seed S]

A byte-level BPE tokenizer is trained on a small built-in corpus and given a chat
template; a small Llama is initialised from a seed and, for the demo, trained for a few
hundred steps on canned dialogues so that it answers a greeting with words, not noise.
Everything is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

DIALOGUES: list[tuple[str, str]] = [
    ("你好", "你好！我是 llm-gateway 的演示模型，很高兴见到你。"),
    ("你好,你是谁？", "我是一个很小的演示模型，由 llm-gateway 在本地构建。"),
    ("你是谁", "我是 llm-gateway 的演示模型。"),
    ("hello", "Hello! I am the llm-gateway demo model."),
    ("Hello!", "Hello! I am a tiny demo model served by llm-gateway."),
    ("hi", "Hi! How can I help you today?"),
    ("who are you?", "I am a tiny demo model, built locally by llm-gateway."),
    ("what can you do?", "I can say hello. Real models are configured in models.yaml."),
    ("谢谢", "不客气！"),
    ("再见", "再见，祝你愉快！"),
    ("thank you", "You are welcome!"),
    ("bye", "Goodbye, have a nice day!"),
]
CORPUS_EXTRA = [
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Large language models are served by the gateway from a YAML registry.",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。我们在本地运行开源模型。",
    "def main():\n    print('hello world')\n",
]


def build_tokenizer(out: Path, vocab_size: int = 600) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [text for pair in DIALOGUES for text in pair] + CORPUS_EXTRA
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token=None,
        model_max_length=1024,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(out))
    return wrapped


def build_model(
    tokenizer: Any, seed: int, layers: int = 2, hidden: int = 64, init_std: float = 0.02
) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if init_std != 0.02:  # wider weights make an untrained model say varied things
        for parameter in model.parameters():
            if parameter.dim() > 1:
                torch.nn.init.normal_(parameter, std=init_std)
    return model


def train(model: Any, tokenizer: Any, steps: int, seed: int) -> float:
    """Fit the canned dialogues: enough for a greeting to get a sensible answer."""
    import torch

    torch.manual_seed(seed)
    rows = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        for q, a in DIALOGUES
    ]
    batch = tokenizer(rows, add_special_tokens=False, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def build(
    out: Path,
    seed: int = 0,
    train_steps: int = 0,
    layers: int = 2,
    hidden: int = 64,
    init_std: float = 0.02,
) -> Path:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    model = build_model(tokenizer, seed, layers, hidden, init_std)
    loss = train(model, tokenizer, train_steps, seed) if train_steps else None
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(out))
    (out / "llm-gateway-tiny.json").write_text(
        json.dumps({"seed": seed, "train_steps": train_steps, "final_loss": loss}) + "\n"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--init-std", type=float, default=0.02)
    args = parser.parse_args()
    path = build(args.out, args.seed, args.train_steps, args.layers, args.hidden, args.init_std)
    print(f"built {path}")


if __name__ == "__main__":
    main()
