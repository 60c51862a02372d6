"""Train an equinox MLP on scikit-learn's digits with optax momentum SGD, batch sizes from a
schedule: the optimal one against a constant batch at equal samples.

The optimal schedule comes from the matrix-free sensitivity of the training loss (theory 4; with
momentum mu the first-order optimum is SGD's at the effective step tau = lr / (1 - mu), theory 7)
followed by the exact integer optimum of ``sum_k phi_k / b_k``. Training draws variable-size
batches from a NumPy iterator and runs one jitted step of fixed shape: each batch is padded to the
largest batch of the schedule and masked, so nothing recompiles when the batch size changes (the
script counts the traces and asserts there is one). Prints the final test loss of each schedule,
mean and standard error over seeds.

    python experiments/train_digits_mlp.py [--width 32] [--steps 200] [--samples 3200]
                                           [--lr 0.05] [--momentum 0.5] [--seeds 6]
"""

import argparse
import time

import jax

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--width", type=int, default=32, help="hidden width")
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--samples", type=int, default=3200, help="sample budget (mean batch samples / steps)")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--momentum", type=float, default=0.5)
parser.add_argument("--seeds", type=int, default=6, help="training runs per schedule")
parser.add_argument("--examples", type=int, default=8, help="examples sampled for phi")
args = parser.parse_args()

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import jaxsched as js  # noqa: E402

X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)
model = eqx.nn.MLP(64, 10, args.width, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
params0, static = eqx.partition(model, eqx.is_array)


def cross_entropy(p, example):
    image, label = example
    logits = eqx.combine(p, static)(image)
    return jax.nn.logsumexp(logits) - logits[label]


# ---- the schedule ------------------------------------------------------------------------------
K, N = args.steps, args.samples
tau = args.lr / (1.0 - args.momentum)
problem = js.DataProblem(cross_entropy, (jnp.asarray(X_train), jnp.asarray(y_train)), params0)
t0 = time.perf_counter()
sens = js.sensitivity_matrix_free(
    problem,
    lr=tau,
    steps=K,
    num_examples=args.examples,
    chunk_size=args.examples,
    key=jax.random.PRNGKey(1),
    steps_per_panel=20,
    nodes_per_panel=2,
    rtol=1e-4,
    atol=1e-7,
)
phi = np.asarray(sens.phi, np.float64)
schedules = {
    "optimal": js.schedule_fn(js.integer_optimum(phi, N)),
    "constant": js.schedule_fn(js.constant_schedule(K, N)),
}
print(
    f"d = {problem.dim}, K = {K}, N = {N}, lr = {args.lr}, momentum = {args.momentum}; "
    f"phi in {time.perf_counter() - t0:.1f} s"
)
for name, s in schedules.items():
    b = np.asarray(s.batch_sizes)
    print(
        f"  {name}: batch {b[0]} -> {b[-1]}, {len(s.stages())} stages, predicted noise term "
        f"sum phi/b = {np.sum(phi / b):.4g}"
    )
MAX_B = max(int(np.max(s.batch_sizes)) for s in schedules.values())


# ---- training: a NumPy iterator of variable-size batches, one fixed-shape masked step ---------
def batches(schedule, rng):
    """Yield (indices padded to MAX_B, mask) for each step; batch k has schedule(k) examples drawn
    with replacement (the sampling the sensitivity assumes)."""
    for k in range(schedule.steps):
        b = int(schedule(k))
        idx = np.zeros(MAX_B, dtype=np.int32)
        idx[:b] = rng.integers(0, len(y_train), size=b)
        yield idx, (np.arange(MAX_B) < b).astype(np.float32)


opt = optax.sgd(args.lr, momentum=args.momentum)
traces = []
Xtr, ytr = jnp.asarray(X_train), jnp.asarray(y_train)


@eqx.filter_jit
def train_step(p, state, idx, mask):
    traces.append(1)  # Python side effect: runs only when tracing

    def loss(q):
        per = jax.vmap(cross_entropy, in_axes=(None, 0))(q, (Xtr[idx], ytr[idx]))
        return jnp.sum(mask * per) / jnp.sum(mask)  # the mean over the real examples

    grads = jax.grad(loss)(p)
    updates, state = opt.update(grads, state, p)
    return optax.apply_updates(p, updates), state


@eqx.filter_jit
def test_loss(p):
    return jnp.mean(jax.vmap(cross_entropy, in_axes=(None, 0))(p, (jnp.asarray(X_test), jnp.asarray(y_test))))


results = {}
t0 = time.perf_counter()
for name, schedule in schedules.items():
    finals = []
    for seed in range(args.seeds):
        p, state = params0, opt.init(params0)
        for idx, mask in batches(schedule, np.random.default_rng(seed)):
            p, state = train_step(p, state, idx, mask)
        finals.append(float(test_loss(p)))
    results[name] = np.asarray(finals)
assert len(traces) == 1, f"the training step was traced {len(traces)} times"
print(
    f"trained {args.seeds} seeds x {len(schedules)} schedules in {time.perf_counter() - t0:.1f} s "
    f"(one trace of the training step)"
)
for name, v in results.items():
    print(f"  {name:9s} final test loss {v.mean():.4f} +- {v.std(ddof=1) / np.sqrt(len(v)):.4f} (s.e.)")
diff = results["constant"] - results["optimal"]  # same seeds: paired
print(
    f"  constant - optimal: {diff.mean():+.4f} +- {diff.std(ddof=1) / np.sqrt(len(diff)):.4f} (paired s.e.)"
)
