"""Compare the MLP Hessian of dynscope.curvature with the generic autodiff Hessians.

Run: ``python benchmarks/hessian.py`` (add ``--quick`` to skip the digits network, whose generic
references take minutes). Each (network, method) pair runs in a fresh subprocess, which builds the
network and records its resident memory. It then runs the method ``--repeats`` times (once when
a run takes longer than 10 s) and reports the median wall time and the peak resident memory above
the baseline (``resource.getrusage``; tracemalloc does not see torch's allocations), with glibc's
mmap threshold fixed so that freed tensors leave the resident set. The ratios are
taken between medians measured in the same invocation. Methods:

- ``dynscope``: `dynscope.curvature.hessian` (the layer-by-layer MLP path);
- ``torch.func``: ``torch.func.hessian`` of the loss of the flat parameter vector; for the digits
  network the same forward-over-reverse products are batched with ``torch.func.vmap(...,
  chunk_size=512)`` because the unchunked vmap would hold N x width x P activations;
- ``autograd``: ``torch.autograd.functional.hessian`` (one double-backward per row); for the
  digits network the time is extrapolated from 256 of its 9,610 rows;
- ``jax``: ``jax.jit(jax.hessian(loss))`` when JAX is importable (skipped otherwise; the time
  excludes compilation).

Then the top eigenvalue at tolerance 1e-6, each method building its own operator, with medians
over rounds that run the methods in turn and the error of each against ``eigvalsh`` of the dense
Hessian: Lanczos (`dynscope.curvature.top_eigenvalues`, residual at most 1e-6 times the
eigenvalue); power iteration on the same products, stopped when the eigenvalue changes by less
than 1e-6 relative; PyHessian's power iteration (same stopping rule, autograd products); and
hessian-eigenthings' Lanczos with the fewest steps at which it reports convergence. PyHessian and
hessian-eigenthings are skipped when not installed (``nox -s bench`` installs them).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dynscope import curvature, data, losses, models

SLOW_SECONDS = 10.0
CASES = ("spiral", "tanh", "digits")
METHODS = ("dynscope", "torch.func", "autograd", "jax")


@dataclass(frozen=True)
class Case:
    """One network, loss and batch to differentiate."""

    name: str
    description: str
    model: models.MLP
    loss: losses.ClassificationLoss
    inputs: Tensor
    targets: Tensor
    step: int


def build_case(name: str) -> Case:
    """Build a benchmark network with its data; the dynamical losses sit mid-oscillation."""
    if name == "spiral":
        x, y = data.make_spiral(3, 100)
        model = models.build_mlp(2, 3, width=100, depth=1, activation="relu")
        loss = losses.make_loss("dce", 3, amplitude=70.0, period=5000)
        description = "spiral, 2-100-3 ReLU, N = 300, float64, dce"
        return Case(name, description, model, loss, torch.from_numpy(x), torch.from_numpy(y), 1250)
    if name == "tanh":
        x, y = data.make_spiral(3, 300)
        model = models.build_mlp(2, 3, width=64, depth=2, activation="tanh", dtype=torch.float32)
        loss = losses.make_loss("dmse1", 3, amplitude=10.0, period=1000)
        description = "spiral, 2-64-64-3 tanh, N = 900, float32, dmse1"
        inputs = torch.from_numpy(x).float()
        return Case(name, description, model, loss, inputs, torch.from_numpy(y), 250)
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        model = models.build_mlp(64, 10, width=128, depth=1, activation="relu")
        description = "sklearn digits, 64-128-10 ReLU, N = 1797, float64, ce"
        inputs = torch.from_numpy(digits.data / 16.0)
        targets = torch.from_numpy(digits.target).long()
        return Case(name, description, model, losses.CrossEntropy(10), inputs, targets, 0)
    raise ValueError(f"unknown case {name!r}: use one of {', '.join(CASES)}")


def flat_loss(case: Case) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """Return the loss as a function of the flat parameters, and the current parameters."""
    names = [name for name, _ in case.model.named_parameters()]
    shapes = [parameter.shape for _, parameter in case.model.named_parameters()]
    sizes = [parameter.numel() for _, parameter in case.model.named_parameters()]
    flat = models.flatten_parameters(case.model)
    inputs = case.inputs.to(flat.dtype)

    def loss_of_flat(vector: Tensor) -> Tensor:
        pieces = torch.split(vector, sizes)
        parameters = {n: p.view(s) for n, p, s in zip(names, pieces, shapes, strict=True)}
        outputs = torch.func.functional_call(case.model, parameters, (inputs,))
        return case.loss(outputs, case.targets, step=case.step)

    return loss_of_flat, flat


def method_function(case: Case, method: str) -> Callable[[], object]:
    """Return a function computing the dense Hessian with one method."""
    if method == "dynscope":
        return lambda: curvature.hessian(
            case.model, case.loss, case.inputs, case.targets, case.step
        )
    loss_of_flat, flat = flat_loss(case)
    if method == "torch.func":
        if case.name != "digits":
            return lambda: torch.func.hessian(loss_of_flat)(flat)
        gradient = torch.func.grad(loss_of_flat)

        def row(tangent: Tensor) -> Tensor:
            return torch.func.jvp(gradient, (flat,), (tangent,))[1]

        identity = torch.eye(flat.numel(), dtype=flat.dtype)
        return lambda: torch.func.vmap(row, chunk_size=512)(identity)
    if method == "autograd":
        if case.name == "digits":
            return autograd_row_estimate(loss_of_flat, flat)
        return lambda: torch.autograd.functional.hessian(loss_of_flat, flat)
    if method == "jax":
        return jax_hessian(case)
    raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")


def autograd_row_estimate(
    loss_of_flat: Callable[[Tensor], Tensor], flat: Tensor, rows: int = 256
) -> Callable[[], object]:
    """Return a function timing ``rows`` rows of the autograd Hessian, scaled to all P rows.

    ``torch.autograd.functional.hessian`` (``vectorize=False``) builds the gradient graph once
    and runs one ``torch.autograd.grad`` per row; all rows cost the same, so the total time is
    estimated from the first ``rows`` rows. The whole Hessian would take many minutes here.
    """

    def run() -> float:
        started = time.perf_counter()
        vector = flat.detach().clone().requires_grad_(True)
        gradient = torch.autograd.grad(loss_of_flat(vector), vector, create_graph=True)[0]
        for index in range(rows):
            torch.autograd.grad(gradient[index], vector, retain_graph=True)
        return (time.perf_counter() - started) * flat.numel() / rows

    return run


def jax_hessian(case: Case) -> Callable[[], object]:
    """Return a compiled JAX Hessian of the same loss; raises ImportError without JAX."""
    import jax
    import jax.numpy as jnp

    if case.inputs.dtype == torch.float64 or case.model.linears[0].weight.dtype == torch.float64:
        jax.config.update("jax_enable_x64", True)
    layers = [
        (lin.weight.detach().numpy(), lin.bias.detach().numpy()) for lin in case.model.linears
    ]
    sizes = [w.size + b.size for w, b in layers]
    flat = jnp.asarray(models.flatten_parameters(case.model).numpy())
    inputs = jnp.asarray(case.inputs.to(case.model.linears[0].weight.dtype).numpy())
    targets = case.targets.numpy()
    classes = layers[-1][0].shape[0]
    gamma = jnp.asarray(case.loss.gamma_at(case.step, classes), dtype=flat.dtype)
    one_hot = jnp.eye(classes, dtype=flat.dtype)[targets]
    activation = {"relu": jax.nn.relu, "tanh": jnp.tanh}[case.model.activation]

    def loss(vector):  # type: ignore[no-untyped-def]
        hidden = inputs
        offset = 0
        for index, (weight, _) in enumerate(layers):
            w = vector[offset : offset + weight.size].reshape(weight.shape)
            b = vector[offset + weight.size : offset + sizes[index]]
            offset += sizes[index]
            hidden = hidden @ w.T + b
            if index < len(layers) - 1:
                hidden = activation(hidden)
        sample_weight = gamma[targets] if case.loss.name in ("dce", "dmse1") else 1.0
        class_weight = gamma if case.loss.name == "dmse2" else 1.0
        if case.loss.name in ("ce", "dce"):
            per_sample = -jnp.sum(one_hot * jax.nn.log_softmax(hidden), axis=1)
        else:
            per_sample = jnp.sum(class_weight * (hidden - one_hot) ** 2, axis=1)
        return jnp.mean(sample_weight * per_sample)

    compiled = jax.jit(jax.hessian(loss))
    compiled(flat).block_until_ready()
    return lambda: compiled(flat).block_until_ready()


def resident_bytes() -> int:
    """Return the current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def measure(case_name: str, method: str, repeats: int) -> dict[str, object]:
    """Time one method on one case in this process; return the median and the peak memory."""
    case = build_case(case_name)
    try:
        compute = method_function(case, method)
    except ImportError as error:
        return {"skipped": f"{error}"}
    baseline = resident_bytes()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        value = compute()
        elapsed = time.perf_counter() - started
        # A float return value is a time estimated from part of the work.
        times.append(value if isinstance(value, float) else elapsed)
        del value  # so the previous Hessian does not count towards the next run's peak
        if times[-1] > SLOW_SECONDS:
            break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(parameter.numel() for parameter in case.model.parameters())
    itemsize = case.model.linears[0].weight.element_size()
    return {
        "median_s": statistics.median(times),
        "runs": len(times),
        "peak_mb": (peak - baseline) / 2**20,
        "hessian_mb": size * size * itemsize / 2**20,
        "params": size,
    }


def measure_in_subprocess(case_name: str, method: str, repeats: int) -> dict[str, object]:
    """Run `measure` in a fresh interpreter, so peak memory belongs to this method alone."""
    command = [sys.executable, __file__, "--measure", case_name, method, "--repeats", str(repeats)]
    # A fixed mmap threshold makes glibc return every large block at once, so the resident size
    # follows the live tensors instead of freed memory kept in the heap.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    completed = subprocess.run(
        command, capture_output=True, text=True, check=False, env=environment
    )
    if completed.returncode != 0:
        return {"skipped": completed.stderr.strip().splitlines()[-1]}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def criterion(case: Case) -> Callable[[Tensor, Tensor], Tensor]:
    """Return the case's loss as ``(outputs, targets) -> scalar``, the form both libraries take."""
    return lambda outputs, targets: case.loss(outputs, targets, step=case.step)


def run_dynscope_lanczos(case: Case, tol: float) -> tuple[float, int]:
    """Find the top eigenvalue with `dynscope.curvature.top_eigenvalues` (product map included)."""
    result = curvature.top_eigenvalues(
        case.model, case.loss, case.inputs, case.targets, case.step, k=1, tol=tol
    )
    return float(result.eigenvalues[0]), result.matvecs


def run_dynscope_power(case: Case, tol: float) -> tuple[float, int]:
    """Find the top eigenvalue by power iteration on the products of `run_dynscope_lanczos`."""
    product = curvature.hessian_vector_product(
        case.model, case.loss, case.inputs, case.targets, case.step
    )
    size = sum(parameter.numel() for parameter in case.model.parameters())
    result = curvature.power_iteration(product, size, tol=tol, max_iterations=20000)
    return result.eigenvalue, result.matvecs


def run_pyhessian(case: Case, tol: float) -> tuple[float, int]:
    """Find the top eigenvalue by PyHessian's power iteration (its stopping rule at ``tol``)."""
    import pyhessian

    count = 0
    original = pyhessian.hessian.__init__.__globals__["hessian_vector_product"]

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal count
        count += 1
        return original(*args, **kwargs)

    pyhessian.hessian.__init__.__globals__["hessian_vector_product"] = counted
    inputs = case.inputs.to(case.model.linears[0].weight.dtype)
    try:
        analysis = pyhessian.hessian(
            case.model, criterion(case), data=(inputs, case.targets), cuda=False
        )
        eigenvalues, _ = analysis.eigenvalues(maxIter=20000, tol=tol, top_n=1)
    finally:
        pyhessian.hessian.__init__.__globals__["hessian_vector_product"] = original
        case.model.zero_grad(set_to_none=True)
    return float(eigenvalues[0]), count


def eigenthings_steps(case: Case, tol: float) -> int:
    """Return the fewest Lanczos steps at which hessian-eigenthings reports convergence at ``tol``.

    Its ``lanczos`` runs a fixed number of steps and then reports whether the Ritz residual
    meets ``tol``. The search (doubling, then bisection) is not timed.
    """

    def converged(steps: int) -> bool:
        return bool(run_eigenthings(case, tol, steps)[2])

    size = sum(parameter.numel() for parameter in case.model.parameters())
    high = 2
    while not converged(high):
        if high >= size - 1:
            return size - 1
        high = min(2 * high, size - 1)
    low = high // 2
    while high - low > 1:
        middle = (low + high) // 2
        if converged(middle):
            high = middle
        else:
            low = middle
    return high


def run_eigenthings(case: Case, tol: float, steps: int) -> tuple[float, int, bool]:
    """Find the top eigenvalue by hessian-eigenthings' Lanczos, ``steps`` steps (autograd)."""
    import hessian_eigenthings as eigenthings

    inputs = case.inputs.to(case.model.linears[0].weight.dtype)
    operator = eigenthings.HessianOperator(
        case.model, [(inputs, case.targets)], eigenthings.supervised_loss(criterion(case))
    )
    result = eigenthings.lanczos(
        operator, k=1, max_iter=steps, tol=tol, which="LA", seed=0, reorthogonalize=True
    )
    return float(result.eigenvalues[0]), steps, bool(result.converged[0])


def compare_top_eigenvalue(case_name: str, repeats: int, tol: float = 1e-6) -> None:
    """Print the top eigenvalue at relative tolerance ``tol`` by each method: median time."""
    case = build_case(case_name)
    if case.model.linears[0].weight.dtype == torch.float64:
        # PyHessian draws its start vectors in the default dtype.
        torch.set_default_dtype(torch.float64)
    dense = curvature.hessian(case.model, case.loss, case.inputs, case.targets, case.step)
    exact = float(torch.linalg.eigvalsh(dense.double())[-1])
    print(f"  exact top eigenvalue (eigvalsh of the dense Hessian): {exact:.10g}")

    methods: dict[str, Callable[[], tuple[float, int]]] = {
        "dynscope lanczos": lambda: run_dynscope_lanczos(case, tol),
        "dynscope power iteration": lambda: run_dynscope_power(case, tol),
    }
    try:
        import pyhessian  # noqa: F401

        methods["pyhessian power iteration"] = lambda: run_pyhessian(case, tol)
    except ImportError as error:
        print(f"  pyhessian skipped: {error}")
    try:
        import hessian_eigenthings  # noqa: F401

        steps = eigenthings_steps(case, tol)
        methods["hessian-eigenthings lanczos"] = lambda: run_eigenthings(case, tol, steps)[:2]
    except ImportError as error:
        print(f"  hessian-eigenthings skipped: {error}")

    for compute in methods.values():
        compute()  # warm-up: first calls pay one-time set-up in torch
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, tuple[float, int]] = {}
    for _ in range(repeats):  # round robin, so load changes hit every method alike
        for name, compute in methods.items():
            started = time.perf_counter()
            results[name] = compute()
            times[name].append(time.perf_counter() - started)
    fast = statistics.median(times["dynscope lanczos"])
    for name in methods:
        value, products = results[name]
        median = statistics.median(times[name])
        print(
            f"  {name:<28} {median:8.4f} s (median of {repeats}), {products:5d} products, "
            f"relative error {abs(value - exact) / abs(exact):.1e}, "
            f"{median / fast:5.1f}x dynscope lanczos"
        )
    torch.set_default_dtype(torch.float32)


def main() -> None:
    """Parse the options, then run every comparison and print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method")
    parser.add_argument("--quick", action="store_true", help="skip the digits network")
    parser.add_argument(
        "--part",
        choices=("all", "hessian", "eigenvalue"),
        default="all",
        help="run the dense Hessians, the top eigenvalue, or both",
    )
    parser.add_argument("--measure", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.measure:
        print(json.dumps(measure(*options.measure, options.repeats)))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    cases = CASES[:2] if options.quick else CASES
    for case_name in cases if options.part != "eigenvalue" else ():
        case = build_case(case_name)
        size = sum(parameter.numel() for parameter in case.model.parameters())
        print(f"\n{case.description}, P = {size}")
        results = {}
        for method in METHODS:
            results[method] = measure_in_subprocess(case_name, method, options.repeats)
            values = results[method]
            if "skipped" in values:
                print(f"  {method:<11} skipped: {values['skipped']}")
                continue
            print(
                f"  {method:<11} {values['median_s']:9.3f} s (median of {values['runs']}), "
                f"peak {values['peak_mb']:8.1f} MB "
                f"({values['peak_mb'] / values['hessian_mb']:.1f}x the Hessian)"
            )
        fast = results["dynscope"]["median_s"]
        for method in METHODS[1:]:
            if "skipped" not in results[method]:
                ratio = results[method]["median_s"] / fast
                print(f"  ratio {method} / dynscope: {ratio:.1f}x")

    for case_name in cases if options.part != "hessian" else ():
        print(f"\ntop eigenvalue, {build_case(case_name).description}")
        compare_top_eigenvalue(case_name, options.repeats)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
