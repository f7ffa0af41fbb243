"""transformers' chat-template Jinja environment, with bounds on what one render may cost.

The environment is ``transformers``' own (``_compile_jinja_template``: immutable sandbox,
``trim_blocks``/``lstrip_blocks``, loop controls, its non-escaping ``tojson``,
``raise_exception``, ``strftime_now``, ``{% generation %}``), so a template renders here
exactly as ``apply_chat_template`` renders it. On top, because templates are untrusted input:

- no constant folding at compile time (``optimized=False``): ``{{ 'a' * 3000000000 }}`` is not
  evaluated while compiling; output is the same, folding only moves work earlier;
- operators and filters that build big values in one C call (``*``, ``**``, ``+``, ``%``,
  ``center``, ``indent``, ``format``, ``tojson(indent=...)``) refuse results above
  ``max_chars``; ``range`` is already capped at 100,000 by Jinja's sandbox;
- a wall-clock limit per render (SIGALRM, main thread only) and an output limit.

Over a bound, :class:`TemplateLimitError` names the bound; callers reject the record.
"""

from __future__ import annotations

import re
import signal
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Optional

DEFAULT_TIME_LIMIT_S = 5.0
DEFAULT_MAX_CHARS = 32_000_000
MAX_TEMPLATE_CHARS = 1_000_000
MAX_TOJSON_INDENT = 1000


class TemplateLimitError(RuntimeError):
    """A render went over a time or size bound."""


def _size(value) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


class _Bounds:
    def __init__(self, max_chars: int):
        self.max_chars = max_chars

    def check(self, n: int, what: str):
        if n > self.max_chars:
            raise TemplateLimitError(f"{what} would build {n:,} items (limit {self.max_chars:,})")

    def binop(self, env_binop):
        max_chars = self.max_chars

        def call_binop(context, operator, left, right):
            if operator == "+":
                if type(left) is str and type(right) is str:  # the common case, kept cheap
                    if len(left) + len(right) > max_chars:
                        self.check(len(left) + len(right), "'+'")
                    return left + right
                self.check(_size(left) + _size(right), "'+'")
            elif operator == "*":
                if isinstance(left, int) and not isinstance(left, bool):
                    left, right = right, left
                if _size(left) and isinstance(right, int):
                    self.check(_size(left) * right, "'*'")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                    self.check(abs(right) * max(1, abs(left).bit_length()) // 3, "'**'")
            elif operator == "%" and isinstance(left, str):
                widths = [int(w) for w in re.findall(r"%[-+ #0]*(\d+)", left)]
                self.check(len(left) + sum(widths), "'%'")
            return env_binop(context, operator, left, right)

        return call_binop

    def wrap_width(self, fn, name):
        """center(s, width) / indent(s, width): output grows with width (per line for indent)."""
        def wrapped(value, *args, **kwargs):
            width = kwargs.get("width", args[0] if args else 0)
            if isinstance(width, int):
                lines = str(value).count("\n") + 1 if name == "indent" else 1
                self.check(len(str(value)) + abs(width) * lines, name)
            return fn(value, *args, **kwargs)

        return wrapped


#: The transformers release this module is tested with (``_compile_jinja_template`` is private
#: API; pyproject allows >=4.45, where it exists).
TESTED_TRANSFORMERS = "5.24"


def _transformers_environment():
    """transformers' chat-template environment (compiling a trivial template to get it). A release
    without the private ``_compile_jinja_template`` fails here, on one line, not mid-render."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError as exc:
        import transformers

        raise ImportError(f"transformers {transformers.__version__} has no chat_template_utils._compile_jinja_template "
                          f"(private API; tested with {TESTED_TRANSFORMERS}): {exc}") from None
    return _compile_jinja_template("").environment


def bounded_environment(max_chars: int = DEFAULT_MAX_CHARS, date: Optional[datetime] = None):
    """An overlay of transformers' environment with the bounds above. ``date`` pins
    ``strftime_now`` (the day a preprocessing run started), so one run is reproducible."""
    base = _transformers_environment()
    env = base.overlay(optimized=False)
    bounds = _Bounds(max_chars)
    env.intercepted_binops = frozenset({"*", "**", "+", "%"})
    env.call_binop = bounds.binop(base.call_binop)
    env.filters = dict(base.filters)
    for name in ("center", "indent"):
        env.filters[name] = bounds.wrap_width(base.filters[name], name)
    fmt = base.filters["format"]

    def bounded_format(value, *args, **kwargs):  # "%9999999d" | format(1)
        widths = re.findall(r"%[-+ #0]*(\d+)", str(value))
        bounds.check(len(str(value)) + sum(map(int, widths)), "format")
        return fmt(value, *args, **kwargs)

    env.filters["format"] = bounded_format
    tojson = base.filters["tojson"]

    def bounded_tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # The indent repeats on every line of the output: keep it to what templates use.
        if isinstance(indent, int) and abs(indent) > MAX_TOJSON_INDENT:
            raise TemplateLimitError(f"tojson indent {indent:,} (limit {MAX_TOJSON_INDENT})")
        return tojson(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = bounded_tojson
    env.globals = dict(base.globals)
    if date is not None:
        env.globals["strftime_now"] = lambda fmt: date.strftime(fmt)
    return env


@contextmanager
def time_limit(seconds: Optional[float], what: str):
    """Raise TemplateLimitError in the block after ``seconds`` (main thread only; elsewhere
    the block runs unbounded in time, still bounded in size)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        raise TemplateLimitError(f"{what} took longer than {seconds:g}s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def compile_template(source: str, env, time_limit_s: float = DEFAULT_TIME_LIMIT_S):
    """Compiled template; ValueError with a one-line reason when it cannot be compiled."""
    import jinja2

    if len(source) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"chat template is {len(source):,} characters (limit {MAX_TEMPLATE_CHARS:,})")
    try:
        with time_limit(time_limit_s, "compiling the chat template"):
            return env.from_string(source)
    except TemplateLimitError as exc:
        raise ValueError(str(exc)) from None
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template line {exc.lineno}: {exc.message}") from None
    except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
        raise ValueError(f"chat template does not compile: {type(exc).__name__}: {str(exc)[:200]}") from None


def render_bounded(template, max_chars: int, time_limit_s: Optional[float], tracker=None, **context) -> str:
    """``template`` rendered with ``context``; output and time bounded. ``tracker``:
    (blocks, spans) lists for ``{% generation %}`` spans, as transformers collects them."""
    blocks = tracker[0] if tracker is not None else []
    total = 0
    with time_limit(time_limit_s, "rendering the chat template"):
        if tracker is not None:
            ctx = template.environment.activate_tracker(*tracker)
        else:
            ctx = _nullcontext()
        with ctx:
            for block in template.generate(**context):
                total += len(block)
                if total > max_chars:
                    raise TemplateLimitError(f"rendered chat exceeds {max_chars:,} characters")
                blocks.append(block)
    return "".join(blocks)


@contextmanager
def _nullcontext():
    yield
