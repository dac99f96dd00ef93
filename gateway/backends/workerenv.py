"""The environment a worker process starts with: an allow-list, never a key source.

A worker runs model code, some of it downloaded (`trust_remote_code`), so it gets only what
Python, the CUDA stack, the hubs, the thread pools and the gateway's own worker protocol
read, and never a variable the registry names as a key source (`gateway.auth.*_env`, any
upstream's `api_key_env`), even when its name matches an allowed prefix. The registry's
`env:` is the operator's own text and is applied as written, except that it may not name a
key source either: `registry.py` rejects that at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# Variables passed through by exact name.
ALLOWED_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TERM",
        "TMPDIR",
        "TMP",
        "TEMP",
        "LD_LIBRARY_PATH",
        "VIRTUAL_ENV",
        "CONDA_PREFIX",
        "TOKENIZERS_PARALLELISM",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        # Hub downloads go through the operator's proxy, if there is one.
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        # Variables that remote model code reads to pick its kernels (TransNormerLLM).
        "use_triton",
        "do_eval",
    }
)
# Variables passed through by prefix: locale, Python, CUDA, hubs, thread pools, caches.
ALLOWED_PREFIXES = (
    "LC_",
    "PYTHON",
    "CUDA_",
    "NVIDIA_",
    "NCCL_",
    "CUBLAS_",
    "CUDNN_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "MODELSCOPE_",
    "ACCELERATE_",
    "SAFETENSORS_",
    "TRITON_",
    "TORCH_",
    "PYTORCH_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "XDG_",
    "LLMGW_",
    # vLLM's own settings, for a model served by `engine: vllm`.
    "VLLM_",
)


# A name passed by prefix that reads as a credential of the gateway's kind (`LLMGW_API_KEYS`
# left in the shell while the registry reads keys from a file) stays out too; the hubs'
# tokens (`HF_TOKEN`, `MODELSCOPE_API_TOKEN`) pass, for a worker may download its weights.
_CREDENTIAL = re.compile(r"(^|_)(KEYS?|SECRETS?|PASSWORDS?)$", re.IGNORECASE)


def allowed(name: str) -> bool:
    if name in ALLOWED_NAMES:
        return True
    return name.startswith(ALLOWED_PREFIXES) and not _CREDENTIAL.search(name)


def inherited(base: Mapping[str, str], secrets: Iterable[str]) -> dict[str, str]:
    """The part of the gateway's environment a worker may see."""
    refused = frozenset(secrets)
    return {k: v for k, v in base.items() if allowed(k) and k not in refused}


def worker_environment(
    base: Mapping[str, str],
    secrets: Iterable[str],
    entry_env: Mapping[str, str],
    settings: Mapping[str, str],
) -> dict[str, str]:
    """The whole environment of a worker, in order of precedence (last wins).

    `base` is the gateway's environment, filtered; `entry_env` the model's `env:`;
    `settings` what the gateway itself decides (the worker spec, devices, paths).
    """
    refused = frozenset(secrets)
    env = inherited(base, refused)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # `devices` are nvidia-smi's numbers
    env.update({k: v for k, v in entry_env.items() if k not in refused})
    env.update(settings)
    return env
