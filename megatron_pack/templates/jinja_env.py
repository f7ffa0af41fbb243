"""transformers' chat-template Jinja environment, with bounds on what one render may cost.

The environment is ``transformers``' own (``_compile_jinja_template``: immutable sandbox,
``trim_blocks``/``lstrip_blocks``, loop controls, its non-escaping ``tojson``,
``raise_exception``, ``strftime_now``, ``{% generation %}``), so a template renders here
exactly as ``apply_chat_template`` renders it. On top, because templates are untrusted input:

- no constant folding at compile time (``optimized=False``): ``{{ 'a' * 3000000000 }}`` is not
  evaluated while compiling; output is the same, folding only moves work earlier;
- operators, filters and string methods that build big values in one C call (``*``, ``**``,
  ``+``, ``%``, ``~``; ``center``, ``indent``, ``format``, ``replace``, ``join``, ``batch``,
  ``slice``, ``tojson(indent=...)``; ``str.zfill/ljust/rjust/center/expandtabs/replace/join/
  translate/format/format_map``; ``lipsum``) refuse results above ``max_chars``, checked before
  the value is built where it grows multiplicatively (``''.zfill(2**31)`` in a template that never
  outputs it once took 2 GB); ``range`` is already capped at 100,000 by Jinja's sandbox;
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


    def method_size(self, owner: str, name: str, args: tuple, kwargs: dict) -> int:
        """Characters a ``str`` method call would build (0: does not grow its string)."""
        arg = lambda i, key, default=0: kwargs.get(key, args[i] if len(args) > i else default)  # noqa: E731
        if name in ("zfill", "ljust", "rjust", "center"):
            width = arg(0, "width")
            return max(len(owner), width) if isinstance(width, int) else 0
        if name == "expandtabs":
            size = arg(0, "tabsize", 8)
            return len(owner) + owner.count("\t") * size if isinstance(size, int) else 0
        if name == "replace":
            old, new = arg(0, "old", None), arg(1, "new", None)
            if isinstance(old, str) and isinstance(new, str):
                hits = owner.count(old) if old else len(owner) + 1
                return len(owner) + hits * max(0, len(new) - len(old))
        if name == "translate" and isinstance(arg(0, "table", None), dict):
            longest = max((_size(v) for v in arg(0, "table").values()), default=1)
            return len(owner) * max(1, longest)
        if name in ("format", "format_map"):
            return self.format_size(owner, args, kwargs)
        return 0

    def format_size(self, owner: str, args: tuple, kwargs: dict) -> int:
        """An upper estimate of ``owner.format(*args, **kwargs)``: the literal, every argument's
        size, and every width a format spec may ask for (literal digits, or any integer argument
        when the width is itself a replacement field)."""
        import string

        values = list(args) + list(kwargs.values())
        for v in list(values):
            if isinstance(v, dict):
                values += list(v.values())
        total = len(owner) + sum(_size(v) for v in values)
        try:
            fields = list(string.Formatter().parse(owner))
        except ValueError:
            return total  # format() raises the same error itself
        for _, _, spec, _ in fields:
            if spec:
                total += sum(int(d) for d in re.findall(r"\d+", spec))
                if "{" in spec:
                    total += sum(abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool))
        return total

    def call(self, env_call):
        """The sandbox's ``call`` with string methods that grow their string checked first."""
        def call(context, obj, *args, **kwargs):
            target = getattr(obj, "__wrapped__", obj)  # str.format arrives wrapped by the sandbox
            owner = getattr(target, "__self__", None)
            if isinstance(owner, str):
                name = getattr(target, "__name__", "")
                if name == "join":
                    items = list(args[0]) if args else []
                    self.check(len(owner) * max(0, len(items) - 1) + sum(_size(i) for i in items), "str.join")
                    args = (items,) + tuple(args[1:])
                else:
                    self.check(self.method_size(owner, name, args, kwargs), f"str.{name}")
            return env_call(context, obj, *args, **kwargs)

        return call

    def sized(self, value, what: str):
        """``value`` itself, after checking its size (for additive operations, built first)."""
        self.check(_size(value), what)
        return value


def _bounded_code_generator(base):
    """Jinja's code generator with ``a ~ b`` (string concatenation, not a sandbox-intercepted
    operator) checked: a template doubling a string in a loop grew without bound."""
    class BoundedCodeGenerator(base):
        def visit_Concat(self, node, frame):
            self.write("environment.bounds.sized(")
            super().visit_Concat(node, frame)
            self.write(", \"'~'\")")

    return BoundedCodeGenerator


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


def _bound_collection_filters(env, bounds: _Bounds) -> None:
    """``replace``, ``join``, ``batch``, ``slice`` and ``lipsum``: sizes checked before building."""
    base = dict(env.filters)

    def replace(eval_ctx, s, old, new, count=None):
        if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
            bounds.check(bounds.method_size(s, "replace", (old, new), {}), "replace")
        return base["replace"](eval_ctx, s, old, new, count)

    def join(eval_ctx, value, d="", attribute=None):
        items = list(value)
        bounds.check(len(str(d)) * max(0, len(items) - 1) + sum(_size(i) for i in items), "join")
        return base["join"](eval_ctx, items, d, attribute)

    def batch(value, linecount, fill_with=None):
        if isinstance(linecount, int):
            bounds.check(linecount, "batch")
        return base["batch"](value, linecount, fill_with)

    def slice_(value, slices, fill_with=None):
        if isinstance(slices, int):
            bounds.check(slices, "slice")
        return base["slice"](value, slices, fill_with)

    from jinja2.utils import pass_eval_context

    env.filters.update(replace=pass_eval_context(replace), join=pass_eval_context(join), batch=batch, slice=slice_)
    lipsum = env.globals.get("lipsum")
    if lipsum is not None:
        def bounded_lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (Jinja's names)
            bounds.check(n * max if isinstance(n, int) and isinstance(max, int) else 0, "lipsum")
            return lipsum(n, html, min, max)

        env.globals["lipsum"] = bounded_lipsum


def bounded_environment(max_chars: int = DEFAULT_MAX_CHARS, date: Optional[datetime] = None):
    """An overlay of transformers' environment with the bounds above. ``date`` pins
    ``strftime_now`` (the day a preprocessing run started), so one run is reproducible."""
    base = _transformers_environment()
    env = base.overlay(optimized=False)
    bounds = _Bounds(max_chars)
    env.intercepted_binops = frozenset({"*", "**", "+", "%"})
    env.call_binop = bounds.binop(base.call_binop)
    env.call = bounds.call(base.call)
    env.bounds = bounds
    env.code_generator_class = _bounded_code_generator(base.code_generator_class)
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
    _bound_collection_filters(env, bounds)
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
        try:
            with ctx:
                for block in template.generate(**context):
                    total += len(block)
                    if total > max_chars:
                        raise TemplateLimitError(f"rendered chat exceeds {max_chars:,} characters")
                    blocks.append(block)
        except MemoryError:  # a growth no bound above foresaw, under a memory limit
            del blocks[:]
            raise TemplateLimitError("rendering the chat template ran out of memory") from None
    return "".join(blocks)


@contextmanager
def _nullcontext():
    yield
