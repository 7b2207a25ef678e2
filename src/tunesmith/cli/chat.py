"""`tunesmith chat`: a terminal conversation with a run's model, streamed token by token."""

from __future__ import annotations

from rich.console import Console


def chat_loop(reference: str, model_name: str | None) -> None:
    """Read a line, stream the reply, keep the history; `/reset` clears it, an empty line or Ctrl-D quits."""
    from tunesmith.serve.engine import ServingEngine
    from tunesmith.serve.protocol import ChatCompletionRequest

    console = Console()
    engine = ServingEngine.from_references([reference])  # a run directory or NAME@VERSION / NAME@ALIAS
    name = model_name or engine.list_models()[0]
    engine.check_model(name)
    console.print(f"[bold]chatting with {name}[/] (models: {', '.join(engine.list_models())}); "
                  "/reset clears the history, an empty line quits")
    history: list[dict] = []
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line})
        request = ChatCompletionRequest(model=name, messages=history, temperature=0)
        reply = []
        console.print(f"[bold magenta]{name}>[/] ", end="")
        for delta in engine.stream(request):
            reply.append(delta.text)
            console.print(delta.text, end="", markup=False, highlight=False)
        console.print()
        history.append({"role": "assistant", "content": "".join(reply)})
