"""Which library warnings a user sees: the one place where they are filtered (standard
library only).

Libraries we build on announce things at import or on first use that are either never
actionable for a user of this project or irrelevant to the backend in use; each entry below
says why it is dropped. ``quiet_imports()`` runs when megatron_patch is imported (before
torch); ``install(backend)`` runs when the backend is chosen, before it imports
megatron-core, whose import-time warnings it governs.

- cpu, npu: megatron-core's "Transformer Engine and Apex are not installed. Falling back to
  ..." (seven of them, on every command) and its "Apex is not installed" notes: there is no
  Transformer Engine for these devices; the local fallbacks are what these backends run.
  Any note about CUDA_DEVICE_MAX_CONNECTIONS is also about CUDA only.
- cuda: the same fallback notes are relevant (Transformer Engine makes a GPU faster), but
  once: one short line from rank 0 when Transformer Engine is missing, instead of seven.
- every backend: megatron-core's "full scope is deprecated. Use empty cuda_graph_scope"
  (raised by megatron-core's own TransformerConfig default, not by anything a user sets);
  torch's renamed-collective FutureWarnings and torch.jit.script deprecation (inside
  megatron-core); the "grad attribute of a Tensor that is not a leaf" note (megatron-core's
  gradient buffers); transformers' "Ignoring clean_up_tokenization_spaces=True for BPE
  tokenizer" (Llama-3's tokenizer_config.json sets it; transformers ignores it for BPE, so
  decoding is unaffected); torchao's notes that a CPU-only torch cannot load its CUDA
  kernel libraries, and torch's enum-registration notice, printed when transformers imports
  torchao.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

TE_APEX = r".*(Transformer Engine|Apex|apex) (and Apex )?(is|are) not installed.*"
ALWAYS = (  # (message regex, category, module regex)
    (r".*full scope is deprecated.*cuda_graph_scope.*", Warning, ""),
    (r".*torch\.jit\.script.* is deprecated.*", Warning, ""),
    (r".*grad attribute of a Tensor that is not a leaf.*", Warning, ""),
    (r".*", FutureWarning, r"torch\.distributed.*"),
)
CUDA_ONLY = (r".*CUDA_DEVICE_MAX_CONNECTIONS.*",)
_installed = set()


def _drop_log_records(logger_name: str, *starts: str) -> None:
    logging.getLogger(logger_name).addFilter(lambda r: not r.getMessage().startswith(starts))


def quiet_imports() -> None:
    """Log records of libraries imported on the way to torch (before any backend)."""
    if "imports" in _installed:
        return
    _installed.add("imports")
    _drop_log_records("torchao", "Failed to load", "Skipping import of cpp extensions")
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda r: "is an Enum subclass and is now natively supported" not in r.getMessage())
    _drop_log_records("transformers.tokenization_utils_tokenizers",
                      "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer")


def install(backend: str) -> None:
    """The filters for ``backend`` (cpu | cuda | npu); once per process."""
    quiet_imports()
    if backend in _installed:
        return
    _installed.add(backend)
    for message, category, module in ALWAYS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    warnings.filterwarnings("ignore", message=TE_APEX)
    if backend != "cuda":
        for message in CUDA_ONLY:
            warnings.filterwarnings("ignore", message=message)
    elif not _importable("transformer_engine") and os.environ.get("RANK", "0") == "0":
        print("megatron_patch: note: Transformer Engine is not installed: megatron-core runs "
              "its local layers and torch optimizers (slower; backends/cuda/README.md)",
              file=sys.stderr, flush=True)


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
