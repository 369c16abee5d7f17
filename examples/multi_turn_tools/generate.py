"""Multi-turn tool use: the model may call a calculator by writing ``<calc>EXPR</calc>``.

Used as ``--custom-generate-function-path examples/multi_turn_tools/generate.py:generate``
(slime's signature). Each turn the engine generates until ``</calc>`` (a stop string), EOS or
the token budget; a tool call is evaluated by :func:`safe_eval` (``ast``, arithmetic only, no
``eval``) and ``<result>VALUE</result>`` is appended as tool tokens (loss mask 0, log-prob 0),
then the engine continues from the exact token ids so far. At most ``--max-turns`` engine calls.
Engine output ids are appended as sampled, never decoded and re-encoded.
"""

from __future__ import annotations

import ast
import operator

from slime_ray.rollout.multi_turn import (append_engine_output, append_tool_tokens, encode_text,
                                          engine_generate, remaining_budget)
from slime_ray.types import SampleStatus

TOOL_OPEN, TOOL_CLOSE = "<calc>", "</calc>"
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def safe_eval(expr: str) -> int | float:
    """Value of an arithmetic expression (numbers, + - * / // % **, parentheses).

    Raises:
        ValueError: anything else (names, calls, attributes...), a too-long expression, an
            exponent above 64, or division by zero.
    """
    if len(expr) > 200:
        raise ValueError("expression too long")

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {type(node).__name__}")

    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except (SyntaxError, ZeroDivisionError) as e:
        raise ValueError(str(e)) from e


def extract_tool_call(text: str) -> str | None:
    """The expression of the last ``<calc>...`` in ``text`` (closing tag optional), or None."""
    start = text.rfind(TOOL_OPEN)
    if start < 0:
        return None
    return text[start + len(TOOL_OPEN):].split(TOOL_CLOSE)[0]


def run_tool(expr: str) -> str:
    """The observation text for a tool call (errors are reported to the model, not raised)."""
    try:
        value = safe_eval(expr)
    except ValueError as e:
        return f"<result>error: {e}</result>\n"
    return f"<result>{value:g}</result>\n" if isinstance(value, float) else f"<result>{value}</result>\n"


async def generate(args, sample, sampling_params):
    """Generate up to ``args.max_turns`` model turns with calculator calls in between."""
    params = dict(sampling_params)
    params["stop"] = list(params.get("stop") or []) + [TOOL_CLOSE]
    session = sample.session_id or f"calc-{sample.index}"
    for _ in range(max(1, args.max_turns)):
        budget = remaining_budget(args, sample, sampling_params.get("max_new_tokens"))
        if budget <= 0:
            sample.status = SampleStatus.TRUNCATED
            break
        out = await engine_generate(args, sample.tokens, {**params, "max_new_tokens": budget}, session_id=session)
        append_engine_output(sample, out)
        expr = extract_tool_call(out.get("text", ""))
        if sample.status != SampleStatus.COMPLETED or expr is None:
            break
        observation = run_tool(expr)
        ids = encode_text(args, observation)[:remaining_budget(args, sample, sampling_params.get("max_new_tokens"))]
        append_tool_tokens(sample, ids, text=observation)
    return sample
