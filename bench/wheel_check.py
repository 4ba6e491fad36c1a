"""`make wheel-check`: the package as users install it, checked without the checkout.

`make test` runs it (so CI does). Steps, each timed:
  1. sdist: setuptools' backend (no build isolation) on a copy of the files git would commit
     (tracked and untracked-not-ignored), so nothing local leaks in; its output carries no
     setuptools deprecation warning; it holds pyproject.toml, README.md, LICENSE, CHANGELOG.md
     and every module.
  2. wheel: built by pip from that sdist, as `python -m build` does (what PyPI users get); the
     same output check.
  3. the wheel's contents: every file under fused_dft/ that git holds (modules and any package
     data the CLI needs), nothing else at the top level, the `fused-dft` console script's target,
     the version equal to fused_dft.__version__, the license as an SPDX expression and its file.
  4. a fresh venv in a temporary folder outside the checkout. torch, triton, transformers and TRL
     are this interpreter's (its site-packages listed in a .pth, whose own .pth files, such as
     an editable install of the checkout, are not run); the wheel is installed with --no-deps,
     and its `fused-dft` script runs the venv's python.
  5. in the venv, from a temporary working folder, without PYTHONPATH: fused_dft imports from the
     venv (its __file__ is checked, and no sys.path entry is the checkout), the loss on the CPU
     against the float64 reference (auto, chunked, and fused through Triton's interpreter; loss
     and gradients compared), a tiny config-built Llama patched and trained one step (its loss
     equal to the stock one before the step), the TRL drop-in imported.
  6. the installed commands: `fused-dft --version`, `python -m fused_dft --version`,
     `fused-dft check --help`, `fused-dft kernels --help`, `fused-dft check --device cpu`, and
     `fused-dft bench --smoke --providers auto` (its worker process runs from the venv too).
  Step 6 runs beside step 5, as many at a time as there are CPUs (--jobs).

Offline: nothing is fetched (pip runs with --no-index). Needs setuptools>=77 (the build
requirement; in the test extra). `--keep` leaves the temporary folder for a look.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fused_dft"
CONSOLE_SCRIPT = "fused-dft = fused_dft.tools.cli:main"
SDIST_FILES = ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md")
# what a build's output must not say (the issue: `project.license` as a table is deprecated)
WARNING_PATTERN = re.compile(r"deprecat|SetuptoolsWarning", re.IGNORECASE)
MIN_SETUPTOOLS = (77,)


class CheckFailed(Exception):
    pass


def package_version() -> str:
    """fused_dft.__version__ as written in the checkout (read, not imported)."""
    tree = ast.parse((ROOT / PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise CheckFailed(f"{PACKAGE}/__init__.py sets no __version__")


def source_files() -> list[str]:
    """The files a commit of this checkout would hold (tracked and untracked-not-ignored)."""
    proc = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CheckFailed(f"git ls-files failed in {ROOT}: {proc.stderr.strip()}")
    return sorted(p for p in proc.stdout.split("\0") if p and (ROOT / p).is_file())


def run(cmd: list[str], *, cwd: Path, env: dict | None = None, what: str) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise CheckFailed(f"{what} failed (exit {proc.returncode}):\n$ {' '.join(cmd)}\n{output}")
    return output


def no_build_warnings(output: str, what: str) -> None:
    lines = [line.strip() for line in output.splitlines() if WARNING_PATTERN.search(line)]
    if lines:
        raise CheckFailed(f"{what}: the build warns:\n  " + "\n  ".join(lines))


def check_setuptools() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("setuptools")
    except PackageNotFoundError:
        found = None
    numbers = tuple(int(x) for x in re.findall(r"\d+", found or "0")[:1])
    if numbers < MIN_SETUPTOOLS:
        raise CheckFailed(
            f"setuptools {found} is installed; the build needs setuptools>=77 "
            "(pip install 'setuptools>=77', or the test extra)"
        )


def build_sdist(work: Path, files: list[str]) -> Path:
    src = work / "src"
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    dist = work / "dist"
    dist.mkdir()
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    output = run([sys.executable, "-c", code, str(dist)], cwd=src, what="building the sdist")
    no_build_warnings(output, "sdist")
    (sdist,) = dist.glob("*.tar.gz")
    return sdist


def build_wheel(work: Path, sdist: Path) -> Path:
    wheels = work / "wheels"
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-index"]
    cmd += ["--no-build-isolation", "--no-cache-dir", "-w", str(wheels), str(sdist)]
    output = run(cmd, cwd=work, what="building the wheel from the sdist")
    no_build_warnings(output, "wheel")
    (wheel,) = wheels.glob("*.whl")
    return wheel


def check_sdist(sdist: Path, version: str, files: list[str]) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    wanted = {f for f in files if f.startswith(f"{PACKAGE}/")} | set(SDIST_FILES)
    missing = sorted(wanted - names)
    if missing:
        raise CheckFailed(f"{sdist.name} lacks {missing}")
    if not sdist.name.startswith(f"{PACKAGE}-{version}."):
        raise CheckFailed(f"{sdist.name}: expected version {version}")


def check_wheel(wheel: Path, version: str, files: list[str]) -> None:
    if not wheel.name.startswith(f"{PACKAGE}-{version}-py3-none-any"):
        raise CheckFailed(f"{wheel.name}: expected {PACKAGE}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = f"{PACKAGE}-{version}.dist-info"
        metadata = whl.read(f"{info}/METADATA").decode()
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
    # every file git holds under the package ships: modules, and any data the CLI reads
    missing = sorted(f for f in files if f.startswith(f"{PACKAGE}/") and f not in names)
    if missing:
        raise CheckFailed(f"{wheel.name} lacks {missing}")
    tops = {n.split("/", 1)[0] for n in names}
    if tops != {PACKAGE, info}:
        raise CheckFailed(f"{wheel.name}: unexpected top-level entries {sorted(tops)}")
    problems = []
    if f"Version: {version}\n" not in metadata:
        problems.append(f"METADATA's Version is not {version}")
    if "License-Expression: Apache-2.0\n" not in metadata:
        problems.append("METADATA has no License-Expression: Apache-2.0")
    if f"{info}/licenses/LICENSE" not in names:
        problems.append("the LICENSE file is not in the wheel")
    for extra in ("triton", "hf", "trl", "bench", "test"):
        if f"Provides-Extra: {extra}\n" not in metadata:
            problems.append(f"no extra {extra!r}")
    if CONSOLE_SCRIPT not in entry_points:
        problems.append(f"entry_points.txt lacks {CONSOLE_SCRIPT!r}")
    if problems:
        raise CheckFailed(f"{wheel.name}: " + "; ".join(problems))


def make_venv(work: Path, wheel: Path) -> tuple[Path, dict]:
    """A venv whose site-packages lists this interpreter's (torch & co.), with the wheel in it."""
    import site

    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work, what="venv")
    parents = site.getsitepackages() + (
        [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    )
    parents = [p for p in dict.fromkeys(parents) if Path(p).is_dir()]
    purelib = Path(
        run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_path('purelib'))",
            ],
            cwd=work,
            what="the venv's site-packages",
        ).strip()
    )
    # paths only: the .pth files there (an editable install of the checkout among them) stay off
    (purelib / "_wheel_check_parent.pth").write_text("\n".join(parents) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.pop("TRITON_INTERPRET", None)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = os.pathsep.join([str(venv / "bin"), env.get("PATH", "")])
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    cmd += ["--ignore-installed", "--no-cache-dir", "--disable-pip-version-check", str(wheel)]
    run(cmd, cwd=work, env=env, what="installing the wheel into the venv")
    # the console script must run the venv's python (else it would import another fused_dft)
    shebang = (venv / "bin" / "fused-dft").read_text().splitlines()[0]
    if not shebang.startswith(f"#!{venv}"):
        raise CheckFailed(
            f"the venv's fused-dft script runs {shebang[2:]!r}, not the venv's python"
        )
    return venv, env


IN_VENV = """
import importlib.metadata, os, sys
from pathlib import Path

venv, root, version = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3]
import torch
import fused_dft

where = Path(fused_dft.__file__).resolve()
assert where.is_relative_to(venv), f"fused_dft imported from {where}, not from the venv {venv}"
on_path = [p for p in sys.path if p and Path(p).resolve() == root]
assert not on_path, f"the checkout {root} is on sys.path"
assert fused_dft.__version__ == version, (fused_dft.__version__, version)
assert importlib.metadata.version("fused_dft") == version, importlib.metadata.version("fused_dft")
print(f"fused_dft {fused_dft.__version__} from {where.parent}; torch {torch.__version__}")

# the loss against the float64 reference, loss and gradients
torch.manual_seed(0)
n, d, v = 37, 40, 129
h0 = torch.randn(n, d, dtype=torch.float64)
w0 = torch.randn(v, d, dtype=torch.float64) * 0.2
labels = torch.randint(0, v, (n,))
labels[::4] = -100
impls = ["auto", "chunked"] + (["fused"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
for loss_type in ("dft", "ce"):
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    ref = fused_dft.fused_linear_dft_loss(h, w, labels, loss_type=loss_type, impl="reference")
    ref_grads = torch.autograd.grad(ref, (h, w))
    for impl in impls:
        h, w = h0.float().requires_grad_(), w0.float().requires_grad_()
        loss = fused_dft.fused_linear_dft_loss(h, w, labels, loss_type=loss_type, impl=impl)
        grads = torch.autograd.grad(loss, (h, w))
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)
        print(f"loss {loss_type:3s} impl {impl:7s} {loss.item():.6f} = reference {ref.item():.6f}")

# a tiny config-built Llama, patched, one training step
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

config = LlamaConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
model = LlamaForCausalLM(config).train()
ids = torch.randint(0, 97, (2, 12))
labels = ids.clone()
labels[:, :3] = -100
stock = model(input_ids=ids, labels=labels).loss.item()
model = fused_dft.patch_model(model, loss_type="ce")
assert fused_dft.is_patched(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
before = model.lm_head.weight.detach().clone()
out = model(input_ids=ids, labels=labels)
assert out.logits is None, "training mode with labels should build no logits"
assert abs(out.loss.item() - stock) <= 1e-5 * max(1.0, abs(stock)), (out.loss.item(), stock)
out.loss.backward()
opt.step()
assert not torch.equal(before, model.lm_head.weight.detach()), "the step changed no weight"
print(f"patched Llama (transformers {transformers.__version__}): loss {out.loss.item():.6f} "
      f"= stock {stock:.6f}, one AdamW step")

import trl
from fused_dft.integrations.trl import SFTTrainer

assert issubclass(SFTTrainer, trl.SFTTrainer)
print(f"fused_dft.integrations.trl.SFTTrainer imports (trl {trl.__version__})")
"""


def venv_jobs(work: Path, venv: Path, version: str) -> list[tuple[str, list[str], dict, object]]:
    """(name, command, extra environment, check of its output) for each run in the venv."""
    script = work / "run" / "wheel_check_in_venv.py"
    script.write_text(textwrap.dedent(IN_VENV))
    cli = str(venv / "bin" / "fused-dft")
    python = str(venv / "bin" / "python")
    bench_out = work / "bench"

    def says(text):
        def check(output: str) -> str:
            if text not in output:
                raise CheckFailed(f"expected {text!r} in:\n{output}")
            return output.strip().splitlines()[0]

        return check

    def version_line(output: str) -> str:
        if output.strip() != f"fused-dft {version}":
            raise CheckFailed(f"printed {output.strip()!r}, not 'fused-dft {version}'")
        return output.strip()

    def check_summary(output: str) -> str:
        summary = output.strip().splitlines()[-1]
        if " 0 failed" not in summary:
            raise CheckFailed(f"a failure:\n{output}")
        return summary

    def bench_files(output: str) -> str:
        for name in ("bench.json", "bench.md", "bench.png"):
            if not (bench_out / name).is_file():
                raise CheckFailed(f"no {name} written:\n{output}")
        results = json.loads((bench_out / "bench.json").read_text())["results"]
        status = {r["provider"]: r.get("status") for r in results}
        if status != {"auto": "ok"}:
            raise CheckFailed(f"providers {status}:\n{output}")
        return "auto ran in its worker process; bench.json, bench.md, bench.png written"

    bench = [cli, "bench", "--smoke", "--device", "cpu", "--providers", "auto"]
    return [
        (
            "import, loss vs reference, patched step",
            [python, str(script), str(venv), str(ROOT), version],
            {"TRITON_INTERPRET": "1"},
            lambda output: output.strip(),
        ),
        ("fused-dft --version", [cli, "--version"], {}, version_line),
        ("python -m fused_dft --version", [python, "-m", PACKAGE, "--version"], {}, version_line),
        ("fused-dft check --help", [cli, "check", "--help"], {}, says("usage: fused-dft check")),
        (
            "fused-dft kernels --help",
            [cli, "kernels", "--help"],
            {},
            says("usage: fused-dft kernels"),
        ),
        ("fused-dft check --device cpu", [cli, "check", "--device", "cpu"], {}, check_summary),
        ("fused-dft bench --smoke", bench + ["--output", str(bench_out)], {}, bench_files),
    ]


def check_in_venv(work: Path, venv: Path, env: dict, version: str, jobs: int) -> None:
    """The runs of venv_jobs, `jobs` at a time (one thread each), from a folder outside the
    checkout; each process keeps to one thread so that the runs share the cores."""
    from concurrent.futures import ThreadPoolExecutor

    here = work / "run"
    here.mkdir()
    env = dict(env, OMP_NUM_THREADS="1")

    def one(job):
        name, cmd, extra, check = job
        t0 = time.perf_counter()
        output = run(cmd, cwd=here, env=dict(env, **extra), what=name)
        try:
            said = check(output)
        except CheckFailed as exc:
            raise CheckFailed(f"{name}: {exc}") from None
        return name, said, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(one, venv_jobs(work, venv, version)))
    for name, said, seconds in results:
        print(f"  {name} ({seconds:.1f} s):")
        print(textwrap.indent(said, "    "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="runs at a time (default: CPUs)"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fused-dft-wheel-check-"))
    if work.resolve().is_relative_to(ROOT):
        raise SystemExit(f"wheel check: the temporary folder {work} is inside the checkout")
    version = package_version()
    steps = []

    def step(name, fn, *a):
        t0 = time.perf_counter()
        result = fn(*a)
        steps.append(f"{name} {time.perf_counter() - t0:.1f} s")
        print(f"wheel check: {name} ok ({time.perf_counter() - t0:.1f} s)", flush=True)
        return result

    try:
        check_setuptools()
        files = source_files()
        sdist = step("sdist", build_sdist, work, files)
        wheel = step("wheel from the sdist", build_wheel, work, sdist)
        step(
            "contents",
            lambda: (check_sdist(sdist, version, files), check_wheel(wheel, version, files)),
        )
        venv, env = step("venv + install --no-deps", make_venv, work, wheel)
        step("runs in the venv", check_in_venv, work, venv, env, version, args.jobs)
    except CheckFailed as exc:
        print(f"wheel check FAILED: {exc}", file=sys.stderr)
        print(f"(files kept in {work})", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - start
    print(f"wheel check: {wheel.name} and {sdist.name} OK in {total:.1f} s ({', '.join(steps)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
