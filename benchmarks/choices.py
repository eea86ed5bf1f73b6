"""Choices benchmark: ticket triage accuracy of whole-option scoring against the token trie,
on the embedded model, and what each costs as options grow.

    python benchmarks/choices.py [--quick] [--json PATH] [--plot PATH]

Workload `triage`: TICKETS, a small labelled set of our own (support tickets, four teams),
classified by the `triage` app below, a covey app with one `{{gen team choices=...}}`. Each
system runs the same app and template with a different `choice_scoring`:
- `covey-whole`: whole options ranked by mean log-probability per token (the default);
- `covey-whole-sum`: whole options ranked by total log-probability (length_normalize=false);
- `covey-trie`: the token trie, which commits to an option's first token before the rest.
Metrics: `accuracy` (fraction of tickets routed to their team) and `order_agreement` (the
fraction routed the same with the options listed in reverse order: 1.0 is order-invariant).
Workload `many_options`: one prompt with N options of several tokens each; `latency_s`
per request for whole-option scoring and the trie, N growing; what "auto" weighs.
Accuracy does not depend on machine load; latencies do (the JSON records the load average).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import parse_args, record, write_results

NAME = "choices"
TEAMS = ("hardware repair", "billing", "account access", "shipping")
SYSTEMS = {
    "covey-whole": {"choice_scoring": "whole"},
    "covey-whole-sum": {"choice_scoring": "whole", "length_normalize": False},
    "covey-trie": {"choice_scoring": "trie"},
}
# (ticket, team): six per team, written for this benchmark.
TICKETS = [
    ("My laptop screen flickers and goes black after a few minutes.", "hardware repair"),
    ("The keyboard on my new notebook has two keys that do not work.", "hardware repair"),
    ("My phone will not charge any more, even with a new cable.", "hardware repair"),
    ("The printer makes a grinding noise and jams on every page.", "hardware repair"),
    ("The fan in my desktop is very loud and the case gets hot.", "hardware repair"),
    ("I dropped my tablet and now the touch screen does not respond.", "hardware repair"),
    ("I was charged twice for my subscription this month.", "billing"),
    ("Please send me an invoice for last month's payment.", "billing"),
    ("I cancelled my plan but you still took money from my card.", "billing"),
    ("Can I get a refund for the annual plan I bought yesterday?", "billing"),
    ("The price on my bill is higher than the one on your website.", "billing"),
    ("How do I change the credit card you charge each month?", "billing"),
    ("I forgot my password and the reset email never arrives.", "account access"),
    ("My account is locked after too many login attempts.", "account access"),
    ("I cannot sign in since I changed my email address.", "account access"),
    ("The two-factor code from the app is always rejected when I log in.", "account access"),
    ("Someone else logged into my account; how do I secure it?", "account access"),
    ("I need to add my colleague as a user on our team account.", "account access"),
    ("My order was supposed to arrive on Monday and it is still not here.", "shipping"),
    ("The tracking number you sent me does not work.", "shipping"),
    ("The parcel arrived with the box crushed and the item missing.", "shipping"),
    ("Can you deliver to my office address instead of my home?", "shipping"),
    ("How long does delivery to Canada usually take?", "shipping"),
    ("The courier left my package at the wrong house.", "shipping"),
]

# The tutorial's template: the options appear only as the gen's choices.
TRIAGE_TEMPLATE = """{{#system}}
You route customer support tickets to the team that handles them.
{{#user}}
{{ticket}}
{{#assistant}}
Team: {{gen team choices="%s"}}"""
# The same with the teams listed in the system prompt: a 135M model then leans towards the
# team named first, whatever the scoring (measured in workload "triage-listed").
LISTED_TEMPLATE = TRIAGE_TEMPLATE.replace(
    "that handles them.",
    "that handles them: hardware repair,\nbilling, account access or shipping.",
)


def build_triage(
    choices: tuple[str, ...] = TEAMS, template: str = TRIAGE_TEMPLATE, **gen_defaults: Any
):
    """The triage app: one semantic function over a list of tickets, fanned out. The
    `gen_defaults` become the gen's SamplingParams defaults (here: how its choices are
    scored)."""
    import covey.graph as cg
    from covey.llm_backend.sampling_params import SamplingParams

    def classify(ticket: str):
        pass

    classify.__doc__ = template % "|".join(choices)
    classify = cg.semantic_function(classify, params=SamplingParams(**gen_defaults))

    @cg.app(name="triage")
    def triage(tickets: list[str]):
        return {"teams": cg.map(classify, over=tickets)}

    return triage


def sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"tickets": len(TICKETS), "options": (4, 32), "repeats": 1}
    return {"tickets": len(TICKETS), "options": (4, 16, 64, 128), "repeats": 3}


def triage_records(runtime, n: int) -> list[dict[str, Any]]:
    """Accuracy per system and prompt on the first `n` tickets; order agreement (options
    listed in reverse) on the tutorial's prompt."""
    tickets = [t for t, _ in TICKETS[:n]]
    labels = [team for _, team in TICKETS[:n]]
    out = []
    for workload, template in (("triage", TRIAGE_TEMPLATE), ("triage-listed", LISTED_TEMPLATE)):
        for system, options in SYSTEMS.items():
            app = build_triage(TEAMS, template, **options)
            forward = runtime.run(app, tickets=tickets)["teams"]
            correct = sum(p == y for p, y in zip(forward, labels))
            params = {"tickets": n, "teams": list(TEAMS), "predictions": forward}
            out.append(record(workload, system, "accuracy", correct / n, params))
            line = f"{workload:14s} {system:16s} accuracy {correct}/{n}"
            if workload == "triage":
                app = build_triage(TEAMS[::-1], template, **options)
                backward = runtime.run(app, tickets=tickets)["teams"]
                same = sum(a == b for a, b in zip(forward, backward))
                out.append(record(workload, system, "order_agreement", same / n, {"tickets": n}))
                line += f"  order agreement {same}/{n}"
            print(line, flush=True)
    return out


def option_texts(n: int) -> tuple[str, ...]:
    """`n` distinct options of several tokens each (a product catalogue, say)."""
    colours = ["red", "blue", "green", "black", "white", "silver", "golden", "purple"]
    things = ["desk lamp", "office chair", "water bottle", "phone case", "travel mug",
              "wall clock", "garden hose", "rain jacket", "picture frame", "coffee grinder",
              "bike helmet", "yoga mat", "table fan", "bath towel", "laptop stand",
              "shoe rack"]
    return tuple(f"{c} {t}" for t in things for c in colours)[:n]


def many_options_records(engine, counts: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """Seconds per request for whole-option scoring and the trie as options grow."""
    from covey.llm_backend.sampling_params import SamplingParams

    prompt = "Customer: I want something to keep my coffee hot on the train.\nProduct:"
    out = []
    for n in counts:
        options = tuple(" " + o for o in option_texts(n))
        tokens = sum(len(engine.tokenizer.encode(o)) for o in options)
        for system, scoring in (("covey-whole", "whole"), ("covey-trie", "trie")):
            params = SamplingParams(choices=options, choice_scoring=scoring)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                engine.run_to_completion([engine.add_request(prompt, params)])
                times.append(time.perf_counter() - start)
            value = statistics.median(times)
            out.append(
                record(
                    "many_options", system, "latency_s", value,
                    {"options": n, "option_tokens": tokens, "times": times},
                )
            )
            print(f"{n:4d} options ({tokens} tokens) {system:12s} {value:.3f}s", flush=True)
    return out


def plot(results: list[dict[str, Any]], path: Path, quick: bool, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    agree = {r["system"]: r["value"] for r in results if r["metric"] == "order_agreement"}
    for k, (workload, colour) in enumerate((("triage", "#3b7"), ("triage-listed", "#b73"))):
        acc = [r for r in results if r["workload"] == workload and r["metric"] == "accuracy"]
        xs = [i + (k - 0.5) * 0.38 for i in range(len(acc))]
        bars = left.bar(xs, [r["value"] for r in acc], width=0.36, color=colour, label=workload)
        for bar, r in zip(bars, acc):
            note = f"{r['value']:.2f}"
            if workload == "triage":
                note += f"\norder {agree.get(r['system'], 0):.2f}"
            left.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.01, note,
                      ha="center", fontsize=7)
        left.set_xticks(range(len(acc)), [r["system"] for r in acc])
    left.axhline(0.25, color="grey", linestyle=":", label="chance (4 teams)")
    left.set_ylim(0, 1.15)
    left.set_ylabel("accuracy")
    left.set_title(f"Ticket triage, {len(TICKETS)} labelled tickets, 4 teams")
    left.legend(fontsize=8)
    for system, colour in (("covey-whole", "#3b7"), ("covey-trie", "#b73")):
        rows = [r for r in results if r["workload"] == "many_options" and r["system"] == system]
        right.plot(
            [r["params"]["options"] for r in rows], [r["value"] for r in rows],
            marker="o", color=colour, label=system,
        )
    right.set_xlabel("options (each 3-4 tokens)")
    right.set_ylabel("seconds per request (median)")
    right.set_title("Cost as options grow (load-dependent)")
    right.legend()
    fig.suptitle(f"covey choices on SmolLM2-135M ({device}{', --quick' if quick else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    from covey.runtime.background import BackgroundRuntime

    size = sizes(args.quick)
    runtime = BackgroundRuntime(dtype="float32")
    try:
        results = triage_records(runtime, size["tickets"])
        from covey.llm_backend.llm_engine import LLMEngine

        engine = LLMEngine(runtime.llm.engine.config, model=runtime.llm.engine.model)  # its own
    finally:
        runtime.close()
    results += many_options_records(engine, size["options"], size["repeats"])
    device = str(engine.device)
    write_results(args, NAME, results, device, engine.model_name)
    plot(results, args.plot, quick=args.quick, device=device)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
