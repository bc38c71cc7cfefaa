"""`multitune chat RUN_DIR`: talk to a fine-tuned model as its chat task was trained (system prompt,
instruction, chat template), the reply streamed token by token (transformers' TextStreamer).

Interactive, the conversation carries over from turn to turn (`/reset` starts over, `/exit` or Ctrl-D
ends); with a file, each line is a prompt of its own and each answer is printed after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import torch

from multitune.errors import UserError
from multitune.data.formatting import Formatter, TooLong
from multitune.results.predict import restore_task
from multitune.results.trained import open_run
from multitune.rundir import RunDir
from multitune.tasks import Task


def chat_task(run: RunDir, name: str | None) -> Task:
    """The run's chat task (the one named, the one called `chat`, or its only chat task), bound as trained."""
    cfg = run.load_config()
    chats = [t.name for t in cfg.tasks if (t.type or "") == "chat"]
    if name is None:
        if not chats:
            raise UserError(f"this run trained no chat task (its tasks: {[t.name for t in cfg.tasks]}); "
                            "`multitune predict` answers its classification and multiple-choice tasks")
        name = "chat" if "chat" in chats else chats[0] if len(chats) == 1 else None
        if name is None:
            raise UserError(f"this run trained {len(chats)} chat tasks; choose one with --task ({', '.join(chats)})")
    task = restore_task(run, name)
    if task.kind != "chat":
        raise UserError(f"task {name} is a {task.kind} task; chat talks to a chat task, `multitune predict` answers this one")
    return task


@dataclass
class Chat:
    model: torch.nn.Module
    formatter: Formatter
    task: Task
    max_new_tokens: int = 256
    temperature: float = 0.0
    history: list[dict[str, str]] = field(default_factory=list)

    @torch.no_grad()
    def reply(self, text: str, streamer=None, keep: bool = True) -> str:
        """The model's answer to ``text`` after the conversation so far (kept for the next turn unless ``keep`` is
        false), its tokens handed to ``streamer`` as they are generated."""
        tok = self.formatter.tokenizer
        msgs = [*self.history, {"role": "user", "content": text}]
        while True:  # long user turns are cut in the middle to fit; when that is not enough, the oldest exchanges go
            try:
                prompt = self.formatter.prompt_ids([self.task.prompt(msgs)], reserve=self.max_new_tokens)[0]
                break
            except TooLong:
                if len(msgs) <= 1:
                    raise
                msgs = msgs[2:]
        dev = next(self.model.parameters()).device
        eot = tok(self.formatter.eot, add_special_tokens=False)["input_ids"][-1]
        sample = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            input_ids=torch.tensor([prompt], device=dev), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
            max_new_tokens=self.max_new_tokens, eos_token_id=[eot, tok.eos_token_id],
            pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id,
            streamer=streamer, **sample,
        )
        answer = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
        if keep:
            self.history = [*msgs, {"role": "assistant", "content": answer.strip()}]
        return answer


def open_chat(run_dir: Path, task_name: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0) -> Chat:
    if max_new_tokens < 1 or temperature < 0:
        raise UserError("--max-new-tokens must be at least 1 and --temperature at least 0 (0: greedy)")
    trained = open_run(Path(run_dir), require="weights")
    task = chat_task(trained.run, task_name)
    model = trained.model([task.name])  # per_task: the chat task's own adapter
    return Chat(model, trained.formatter(task.name), task, max_new_tokens, temperature)


def read_prompts(path: Path) -> list[str]:
    """The non-empty lines of a prompt file (checked before any model is loaded)."""
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{path} holds no prompt; write one prompt per line")
    return prompts


def answer_all(chat: Chat, prompts: list[str]) -> None:
    """Each prompt on its own (no shared history): printed as `>>> prompt`, then its streamed answer."""
    from transformers import TextStreamer

    streamer = TextStreamer(chat.formatter.tokenizer, skip_prompt=True, skip_special_tokens=True)
    for prompt in prompts:
        print(f">>> {prompt}", flush=True)
        chat.reply(prompt, streamer, keep=False)  # TextStreamer prints to stdout, and a newline at the end
        print(flush=True)


def interactive(chat: Chat) -> None:
    from transformers import TextStreamer

    streamer = TextStreamer(chat.formatter.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"chatting with task {chat.task.name} (system prompt: {chat.task.cfg.system_prompt!r}); /reset starts over, /exit ends")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            chat.history = []
            continue
        if text:
            print("assistant> ", end="", flush=True)
            chat.reply(text, streamer)
