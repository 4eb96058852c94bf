"""The README's first command as a new user meets it: a fresh clone, `make install`, `make run`,
then `dvc status`; writes benchmarks/results/first_run.json and prints it.

Run from the repository root, on an otherwise idle machine (it takes about half an hour):

    python benchmarks/first_run.py [--commit HEAD] [--baseline 635512c] [--workdir /tmp/palm-first-run]
    python benchmarks/first_run.py --profile precise      # `palm run --profile precise` instead of `make run`

--commit: what to clone (a commit of this repository; default HEAD, so commit first).
--baseline: also run that commit's default `make run` right after, on the same machine, and
record run_s / its run_s as `ratio_to_<baseline>` (these machines vary by up to 1.8x from day to
day, so the ratio is the figure to compare across days). Without it the ratio is null.
--profile: run `.venv/bin/palm run --profile NAME` after `make install` instead of `make run`, and
write its figures as the `precise` object of first_run.json, keeping the default run's (its
dvc_clean is false by design: dvc.lock records params.yaml's values, docs/profiles.md).

Figures: date (when the run finished), install_s (`make install`), run_s (`make run` after it: the pipeline alone), wall_s
(both), and from the run's own outputs: certified, eps, delta and alpha of the certificate
(portfolio.json), members, trainings (metrics/align.json), answers_evaluated
(metrics/coverage.json), still_beaten (trained rows best-of-N beats at their own weight at the
stated confidence, metrics/align.json), and dvc_clean (`dvc status` has nothing to do). The children's CPU
seconds and peak memory come from the kernel (getrusage), the load average from /proc.
"""
import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "first_run.json"


def timed(cmd: list[str], cwd: Path, log: Path) -> float:
    """Wall seconds of a command, its output appended to `log`; a failure stops the benchmark."""
    started = time.monotonic()
    with log.open("a") as out:
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}); see {log}")
    return round(time.monotonic() - started, 1)


def first_run(commit: str, workdir: Path, profile: str | None = None) -> dict:
    """Clone `commit` into workdir, time `make install` and `make run` (or `palm run --profile`),
    read what the run wrote."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    clone = workdir / (sha if profile is None else f"{sha}-{profile}")
    shutil.rmtree(clone, ignore_errors=True)
    clone.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", sha], cwd=clone, check=True)
    log = workdir / f"{clone.name}.log"
    log.unlink(missing_ok=True)
    load = [round(x, 2) for x in os.getloadavg()]
    install_s = timed(["make", "install"], clone, log)
    run_s = timed(["make", "run"] if profile is None else [".venv/bin/palm", "run", "--profile", profile], clone, log)
    status = subprocess.run([str(clone / ".venv" / "bin" / "dvc"), "status", "--json"], cwd=clone,
                            capture_output=True, text=True)
    portfolio = json.loads((clone / "portfolio.json").read_text())
    cert = portfolio["certificate"]
    align = json.loads((clone / "metrics" / "align.json").read_text())
    coverage = json.loads((clone / "metrics" / "coverage.json").read_text())
    return {"commit": sha, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "install_s": install_s, "run_s": run_s, "wall_s": round(install_s + run_s, 1),
            "certified": bool(cert["certified"]), "eps": portfolio["eps"], "delta": portfolio["delta"],
            "alpha": cert.get("alpha"), "members": len(portfolio["members"]),
            "trainings": align.get("trainings"), "answers_evaluated": coverage.get("answers_evaluated"),
            "still_beaten": align.get("still_beaten"), "max_eps": cert.get("max_eps"),
            "dvc_clean": status.returncode == 0 and json.loads(status.stdout or "{}") == {},
            "load_average_at_start": load, "log": str(log)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="HEAD")
    parser.add_argument("--baseline", help="a commit whose default make run runs right after, for the ratio")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/palm-first-run"))
    parser.add_argument("--profile", help="run `palm run --profile NAME`; its figures go to `precise`")
    args = parser.parse_args()

    earlier = json.loads(OUT.read_text()) if OUT.is_file() else {}
    if args.profile:
        result = first_run(args.commit, args.workdir, args.profile)
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        result.update(profile=args.profile, children_peak_rss_gib=round(usage.ru_maxrss / 2**20, 2),
                      command="python benchmarks/first_run.py " + " ".join(sys.argv[1:]))
        OUT.write_text(json.dumps({**earlier, "precise": result}, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        print(f"wrote {OUT} (precise)")
        return
    result = first_run(args.commit, args.workdir)
    baseline = args.baseline or "635512c"
    result[f"ratio_to_{baseline}"] = None
    if args.baseline:
        before = first_run(args.baseline, args.workdir)
        result["baseline"] = before
        result[f"ratio_to_{baseline}"] = round(result["run_s"] / before["run_s"], 3)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["children_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    result["children_peak_rss_gib"] = round(usage.ru_maxrss / 2**20, 2)
    result["precise"] = earlier.get("precise")  # measured by --profile precise, kept
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    result["command"] = "python benchmarks/first_run.py " + " ".join(sys.argv[1:])
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
