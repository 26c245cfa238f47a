"""How the module reads (issues 14 and 18): python benchmarks/reading_jumps.py [FILE]

A reader's trace: from main() into the stage runner and one stage's run_* function (the figure's
numbers), reading each top-level definition it uses once, depth first, in the order the code
mentions them; a jump is a move of more than 500 lines between two consecutive reads.  The runner
(main, _run_stage, run_stage, the @stage decorator) is read once, before any stage, and is not
counted in a stage's definitions.  Also the longest function.  Static (ast): nothing is imported or run.

Issue 18's goal: every stage reaches at most half of the definitions it reached before it
(BEFORE, measured on commit 6696435).
"""
import ast
import sys
from pathlib import Path

JUMP_LINES = 500
RUNNER = ("main", "_run_stage", "run_stage", "stage")  # read once, not counted per stage
BEFORE = {"flop": 51, "memory": 88, "training": 137, "amp": 98, "dashboard": 150, "lecture": 144}
ENTRY = {"flop": "run_flop_analysis", "memory": "run_memory_analysis", "training": "run_training_comparison",
         "amp": "run_amp_analysis", "dashboard": "run_dashboard_analysis", "lecture": "run_lecture_comparison",
         "roofline": "run_roofline_analysis", "distributed": "run_distributed_analysis"}


def definitions(tree):
    """name -> (first line, names it mentions in order) for every top-level def, class and assignment."""
    found = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        else:
            continue
        used = [n.id for n in sorted((n for n in ast.walk(node) if isinstance(n, ast.Name)),
                                      key=lambda n: (n.lineno, n.col_offset))]
        for name in names:
            found[name] = (node.lineno, used)
    return {k: (line, list(dict.fromkeys(u for u in used if u in found and u != k)))
            for k, (line, used) in found.items()}


def trace(defs, entry):
    """Lines read in order: the runner, then the entry's definitions depth first."""
    runner = [name for name in RUNNER if name in defs]
    order, seen, stack = [defs[name][0] for name in runner], {*runner, entry}, [entry]
    while stack:
        name = stack.pop()
        order.append(defs[name][0])
        for ref in reversed(defs[name][1]):  # reversed: the first mention is read first
            if ref not in seen:
                seen.add(ref)
                stack.append(ref)
    return order, len(seen) - len(runner)


def main(path):
    tree = ast.parse(Path(path).read_text())
    defs = definitions(tree)
    for figure, entry in ENTRY.items():
        if entry not in defs:
            print(f"{figure:9s} -")
            continue
        order, read = trace(defs, entry)
        jumps = sum(abs(a - b) > JUMP_LINES for a, b in zip(order, order[1:]))
        goal = BEFORE.get(figure, 0) // 2
        verdict = "met" if read <= goal else "NOT met"
        mark = f"  (before {BEFORE[figure]}, goal <= {goal}: {verdict})" if goal else "  (a new stage)"
        print(f"{figure:9s} {jumps:3d} jumps over {JUMP_LINES} lines, reading {read:3d} definitions{mark}")
    longest = max((n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    lines = len(Path(path).read_text().splitlines())
    print(f"longest function: {longest[1]} ({longest[0]} lines); module: {lines} lines")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pytorch_practice_demo.py")
