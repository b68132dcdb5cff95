"""Interactive chat with a Megatron checkpoint: ``You >>`` prompt, the tokenizer's chat
template applied to the whole conversation each turn, replies streamed as they are made.

    python -m megatron_patch.inference.chat --load CKPT [--tokenizer DIR] \
        [--system "You are a helpful assistant."] [--temperature 0.7 --top-p 0.9]
    torchrun --nproc_per_node 2 -m megatron_patch.inference.chat --load CKPT --tp 2

Type ``exit`` (or ``quit``, or end the input) to leave, ``clear`` to start a new conversation.
Rank 0 reads the input and shows the replies; every rank runs the model.
A tokenizer without a chat template gets its generation's format
(megatron_patch.tokenizer.chat_templates) and a note saying so.
``--show-prompt`` prints each prompt the model is given, as one JSON string line on stderr.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import torch.distributed as dist

from megatron_patch.cli_args import OneLineErrors

PROMPT = "You >> "
REPLY = "Assistant >> "
EXIT_WORDS = ("exit", "quit")


def build_prompt(tokenizer, messages: List[dict], template: Optional[str] = None) -> str:
    """The text the model continues: the chat template over ``messages`` plus the
    assistant header (``add_generation_prompt``)."""
    kw = {"chat_template": template} if template else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **kw)


def chat_template(tok, tok_dir: str, generation: str, path: Optional[str] = None):
    """The Jinja template to use: ``path``'s contents, else None (the tokenizer's own), else
    (a tokenizer without one) our format for the model's generation, with a note."""
    if path:
        with open(path) as f:
            return f.read()
    if getattr(tok.hf, "chat_template", None):
        return None
    from megatron_patch.tokenizer.chat_templates import BY_GENERATION
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[note] {tok_dir} has no chat template; using the {generation} format",
              file=sys.stderr)
    return BY_GENERATION[generation]


def _broadcast(obj, rank0: bool):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj if rank0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Chat:
    """``engine``: a generation engine (``engine.make_engine``); every rank holds one."""

    def __init__(self, engine, tokenizer, eos_ids, params, system: Optional[str] = None,
                 template: Optional[str] = None, show_prompt: bool = False, out=None, err=None):
        self.engine, self.tok, self.eos = engine, tokenizer, list(eos_ids)
        self.params, self.system, self.template = params, system, template
        self.show_prompt = show_prompt
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.history: List[dict] = []

    def messages(self) -> List[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _prompt_ids(self) -> List[int]:
        room = self.engine.max_length - self.params.max_new_tokens
        while True:
            text = build_prompt(self.tok.hf, self.messages(), self.template)
            ids = self.tok.encode(text, add_special_tokens=False)
            if len(ids) <= room or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # forget the oldest exchange
            if self.rank0:
                print("[note] conversation too long for the context; forgot the oldest turn",
                      file=self.err, flush=True)
        if len(ids) > room:
            raise ValueError(f"the message is {len(ids)} tokens; at most {room} fit with "
                             f"--max-new-tokens {self.params.max_new_tokens}")
        if self.show_prompt and self.rank0:
            print(json.dumps(text, ensure_ascii=False), file=self.err, flush=True)
        return ids

    def reply(self, user_text: str) -> str:
        from megatron_patch.inference.text_stream import TextStream

        self.history.append({"role": "user", "content": user_text})
        ids = self._prompt_ids()
        stream = TextStream(self.tok, eos_ids=self.eos)

        def show(text: str) -> None:
            if self.rank0 and text:
                self.out.write(text)
                self.out.flush()

        if self.rank0:
            self.out.write(REPLY)
        self.engine.generate(ids, self.params, eos_ids=self.eos,
                             on_token=lambda t: show(stream.push(t)))
        show(stream.close())
        answer = stream.text.strip()
        if self.rank0:
            self.out.write("\n\n")
            self.out.flush()
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def loop(self, stdin=None) -> int:
        stdin = stdin or sys.stdin
        turns = 0
        while True:
            line = None
            if self.rank0:
                self.out.write(PROMPT)
                self.out.flush()
                line = stdin.readline()
                line = None if line == "" else line.strip()  # "" = end of input
            line = _broadcast(line, self.rank0)
            if line is None or line.lower() in EXIT_WORDS:
                if self.rank0:
                    self.out.write("\n" if line is None else "")
                    self.out.write("bye\n")
                    self.out.flush()
                return turns
            if not line:
                continue
            if line.lower() == "clear":
                self.history = []
                continue
            try:
                self.reply(line)
            except ValueError as e:  # the same on every rank: the message does not fit
                self.history.pop()
                if self.rank0:
                    print(f"[error] {e}", file=self.err, flush=True)
                continue
            turns += 1


def main(argv=None) -> int:
    from megatron_patch.inference import generate as g

    p = OneLineErrors(prog="chat", description="Chat with a Megatron checkpoint (You >> prompt).")
    g.add_model_args(p)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--chat-template", default=None,
                   help="a Jinja file to use instead of the tokenizer's chat template")
    p.add_argument("--show-prompt", action="store_true",
                   help="print each prompt (JSON string) on stderr")
    a = p.parse_args(argv)
    if a.chat_template and not os.path.isfile(a.chat_template):
        p.error(f"--chat-template {a.chat_template}: no such file (a Jinja template file)")
    from megatron_patch.inference.loading import CheckpointError
    try:
        params = g.sampling_from_args(a)
        runner, tok, tok_dir = g.setup_from_args(a)
    except (CheckpointError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    template = chat_template(tok, tok_dir, runner.arch.generation, a.chat_template)
    chat = Chat(g.engine_from_args(a, runner), tok, g.eos_ids_of(tok, runner.config_dir),
                params, system=a.system, template=template, show_prompt=a.show_prompt)
    try:
        chat.loop()
    except KeyboardInterrupt:
        print("\nbye")
    from megatron_patch import parallel
    parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
