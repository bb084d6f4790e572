"""Tool-calling tasks: a request, the tools on offer (OpenAI function format), the expected calls.

A row asks for one call or, with probability `parallel_fraction`, several independent calls
in one request (parallel calls, to the same tool or to different ones). The tools offered are
the ones needed plus distractors. `expected_calls` is a list of {"name", "arguments"};
optional arguments the request does not mention are left out (their schema default applies).
The demonstration `response` uses the Hermes/Qwen format, one
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` per call.

    prompt:         "Please check the weather in Lima and convert 25 USD to JPY."
    expected_calls: [{"name": "get_weather", "arguments": {"city": "Lima"}},
                     {"name": "convert_currency", "arguments": {"amount": 25, "from_currency": "USD", ...}}]
"""

from __future__ import annotations

import copy
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from rlcpm.data.synthetic.options import fraction, int_range, positive_int
from rlcpm.errors import DataError

CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Toronto", "Sydney", "Mumbai", "Berlin", "Nairobi"]
CURRENCIES = ["USD", "EUR", "JPY", "GBP", "INR", "CAD"]
SYMBOLS = ["AAPL", "MSFT", "NVDA", "TSLA", "AMZN", "IBM"]
LANGUAGES = ["French", "German", "Spanish", "Japanese", "Italian"]
PHRASES = ["good morning", "thank you", "where is the station", "see you tomorrow", "happy birthday"]
CONTACTS = ["ana@example.com", "bo@example.org", "chen@example.net", "dara@example.com"]
SUBJECTS = ["Lunch", "Meeting notes", "Invoice", "Weekend plans"]
BODIES = ["See you at noon", "The notes are attached", "Please pay by Friday", "Call me later"]


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": required,
                "additionalProperties": False,
            },
        },
    }


@dataclass(frozen=True)
class ToolSpec:
    """A tool's schema and a way to draw one request for it: rng -> (clause, arguments)."""

    schema: dict
    make_request: Callable[[random.Random], tuple[str, dict]]

    @property
    def name(self) -> str:
        return self.schema["function"]["name"]


def _weather(rng: random.Random) -> tuple[str, dict]:
    city = rng.choice(CITIES)
    if rng.random() < 0.3:
        return f"check the weather in {city} in fahrenheit", {"city": city, "unit": "fahrenheit"}
    return f"check the weather in {city}", {"city": city}


def _currency(rng: random.Random) -> tuple[str, dict]:
    source, target = rng.sample(CURRENCIES, 2)
    amount = rng.choice([rng.randint(1, 500), round(rng.uniform(1, 100), 2)])
    clause = f"convert {amount} {source} to {target}"
    return clause, {"amount": amount, "from_currency": source, "to_currency": target}


def _timer(rng: random.Random) -> tuple[str, dict]:
    minutes = rng.randint(1, 90)
    if rng.random() < 0.4:
        label = rng.choice(["tea", "pasta", "laundry", "break"])
        return f"set a timer for {minutes} minutes called {label}", {"minutes": minutes, "label": label}
    return f"set a timer for {minutes} minutes", {"minutes": minutes}


def _stock(rng: random.Random) -> tuple[str, dict]:
    symbol = rng.choice(SYMBOLS)
    return f"get the current stock price of {symbol}", {"symbol": symbol}


def _flights(rng: random.Random) -> tuple[str, dict]:
    origin, destination = rng.sample(CITIES, 2)
    date = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    args = {"origin": origin, "destination": destination, "date": date}
    return f"find flights from {origin} to {destination} on {date}", args


def _translate(rng: random.Random) -> tuple[str, dict]:
    text, language = rng.choice(PHRASES), rng.choice(LANGUAGES)
    return f"translate '{text}' into {language}", {"text": text, "target_language": language}


def _email(rng: random.Random) -> tuple[str, dict]:
    to, subject, body = rng.choice(CONTACTS), rng.choice(SUBJECTS), rng.choice(BODIES)
    clause = f"email {to} with the subject '{subject}' saying '{body}'"
    return clause, {"to": to, "subject": subject, "body": body}


STRING = {"type": "string"}
TOOLS = [
    ToolSpec(
        _function(
            "get_weather", "Get the current weather in a city.",
            {"city": {"type": "string", "description": "City name"},
             "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}},
            ["city"],
        ),
        _weather,
    ),
    ToolSpec(
        _function(
            "convert_currency", "Convert an amount of money from one currency to another.",
            {"amount": {"type": "number", "exclusiveMinimum": 0},
             "from_currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
             "to_currency": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            ["amount", "from_currency", "to_currency"],
        ),
        _currency,
    ),
    ToolSpec(
        _function(
            "set_timer", "Start a countdown timer.",
            {"minutes": {"type": "integer", "minimum": 1, "maximum": 180}, "label": STRING},
            ["minutes"],
        ),
        _timer,
    ),
    ToolSpec(
        _function(
            "get_stock_price", "Get the latest price of a stock by its ticker symbol.",
            {"symbol": {"type": "string", "pattern": "^[A-Z]{1,5}$"}},
            ["symbol"],
        ),
        _stock,
    ),
    ToolSpec(
        _function(
            "search_flights", "Search flights between two cities on a date.",
            {"origin": STRING, "destination": STRING,
             "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$", "description": "YYYY-MM-DD"}},
            ["origin", "destination", "date"],
        ),
        _flights,
    ),
    ToolSpec(
        _function(
            "translate_text", "Translate a text into another language.",
            {"text": STRING, "target_language": {"type": "string", "enum": LANGUAGES}},
            ["text", "target_language"],
        ),
        _translate,
    ),
    ToolSpec(
        _function(
            "send_email", "Send an email.",
            {"to": {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"}, "subject": STRING, "body": STRING},
            ["to", "subject", "body"],
        ),
        _email,
    ),
]  # fmt: skip
TOOL_FORMAT_HINT = (
    'Call tools by answering with one <tool_call>{"name": ..., "arguments": {...}}</tool_call> per call.'
)


def tool_call_text(calls: list[dict]) -> str:
    """The Hermes/Qwen rendering of calls: one <tool_call> block each."""
    return "\n".join(f"<tool_call>\n{json.dumps(call)}\n</tool_call>" for call in calls)


def _join_clauses(clauses: list[str]) -> str:
    text = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return f"Please {text}."


def generate_tool_use(
    num_samples: int,
    seed: int = 0,
    *,
    num_tools: int | list[int] = (2, 4),
    parallel_fraction: float = 0.3,
    max_parallel_calls: int = 3,
    tools_in_prompt: bool = False,
) -> list[dict]:
    """Seeded tool-calling tasks: rows {id, prompt, tools, expected_calls, response}.

    Args:
        num_tools: tools offered per row, an int or [low, high] (at least the ones needed).
        parallel_fraction: probability that a row asks for 2..max_parallel_calls calls at once.
        max_parallel_calls: most calls in one parallel request.
        tools_in_prompt: append the tool schemas and the <tool_call> format to the prompt text
            (for raw prompts; chat templates that support tools render the `tools` column instead).
    """
    num_samples = positive_int(num_samples, "num_samples")
    low, high = int_range(num_tools, "num_tools", 1)
    parallel = fraction(parallel_fraction, "parallel_fraction")
    max_calls = positive_int(max_parallel_calls, "max_parallel_calls", 2)
    if high > len(TOOLS):
        raise DataError(f"synthetic option 'num_tools' may be at most {len(TOOLS)}, got {num_tools!r}")
    rng = random.Random(seed)
    rows = []
    for index in range(num_samples):
        num_calls = rng.randint(2, max_calls) if rng.random() < parallel else 1
        called = [rng.choice(TOOLS) for _ in range(num_calls)]
        clauses, calls = [], []
        for tool in called:
            for _ in range(20):  # parallel calls to one tool must differ
                clause, arguments = tool.make_request(rng)
                if {"name": tool.name, "arguments": arguments} not in calls:
                    break
            clauses.append(clause)
            calls.append({"name": tool.name, "arguments": arguments})
        needed = list(dict.fromkeys(tool.name for tool in called))
        others = [tool.name for tool in TOOLS if tool.name not in needed]
        num_offered = max(len(needed), rng.randint(low, high))
        offered = needed + rng.sample(others, min(len(others), num_offered - len(needed)))
        rng.shuffle(offered)
        schemas = [copy.deepcopy(tool.schema) for name in offered for tool in TOOLS if tool.name == name]
        prompt = _join_clauses(clauses)
        if tools_in_prompt:
            listing = "\n".join(json.dumps(schema) for schema in schemas)
            prompt = f"{prompt}\n\nTools:\n{listing}\n{TOOL_FORMAT_HINT}"
        rows.append(
            {
                "id": f"tool_use-{seed}-{index}",
                "prompt": prompt,
                "tools": schemas,
                "expected_calls": calls,
                "response": tool_call_text(calls),
            }
        )
    return rows
