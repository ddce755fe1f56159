"""Errors a user can act on. The CLI prints their message as one line and exits with code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class LRPError(Exception):
    """Bad input: a missing or broken file, an unknown tensor name, an unsupported graph."""


class UnsupportedOpsError(LRPError):
    """Ops on the relevance path that no rule handles: every one is listed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        listing = "; ".join(problems)
        super().__init__(
            f"{len(problems)} node(s) on the relevance path have no rule: {listing}. "
            f"Re-export without these ops, pick another --source, or add a rule in lrp_onnx/vjp/ops.py")
