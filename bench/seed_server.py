"""The seed scripts' serving pattern, for comparison: `python -m bench.seed_server MODEL`.

A faithful copy of `seeds/` (DeepSeek-MoE and TransNormer api.py): one FastAPI app, the
model in module globals loaded before uvicorn starts, and a blocking `model.generate`
called straight from an `async def` handler, so the event loop serves one request at a time
and nothing else (not even a 404) while it generates. Changes, all in the seed's favour or
needed to run at all, none touching the serving pattern:
- transformers 5 returns a dict from `apply_chat_template(..., return_tensors="pt")`, so it
  is unpacked into `generate` (the seed passed the tensor);
- the decode slices the new tokens of row 0 (the seed sliced the batch dimension and always
  answered ""), and the reply carries `usage` so the benchmark can count tokens;
- no CUDA cache clearing (CPU), and the log line is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

app = FastAPI()
model: Any = None
tokenizer: Any = None


@app.post("/")
async def create_item(request: Request) -> dict[str, Any]:
    json_post_raw = await request.json()
    json_post = json.dumps(json_post_raw)
    json_post_list = json.loads(json_post)
    prompt = json_post_list.get("prompt")
    max_length = json_post_list.get("max_length")
    messages = [{"role": "user", "content": prompt}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    outputs = model.generate(**inputs.to(model.device), max_new_tokens=max_length)
    new_tokens = outputs[0][inputs["input_ids"].shape[1] :]
    result = tokenizer.decode(new_tokens, skip_special_tokens=True)
    now = datetime.datetime.now()
    time = now.strftime("%Y-%m-%d %H:%M:%S")
    answer = {
        "response": result,
        "status": 200,
        "time": time,
        "usage": {"completion_tokens": len(new_tokens)},
    }
    log = "[" + time + "] " + '", prompt:"' + prompt + '", response:"' + repr(result) + '"'
    print(log)
    return answer


def main() -> None:
    global model, tokenizer
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=6006)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, trust_remote_code=True, dtype=torch.float32
    )
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    model.eval()
    uvicorn.run(app, host="127.0.0.1", port=args.port, workers=1)


if __name__ == "__main__":
    main()
