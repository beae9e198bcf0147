"""SGD's stationary distribution on quadratics vs the Langevin/Gibbs prediction,
and McAllester's theorem dL(eta)/deta at 0 = E_i ||g_i||^2 / 4.

Three checks from the lecture "Gradient Flow and Langevin Dynamics":

1. 1-D: SGD with B = 1 on L(x) = h x^2 / 2 with gradient noise of variance
   sigma^2.  The stationary density is close to the Gibbs density
   exp(-L / (alpha eta sigma^2)); the Langevin SDE dx = -g dt + sqrt(eta sigma^2) dW
   gives alpha = 1/2 exactly (the lecture's "alpha ~ 1/10" is a loose constant),
   and the exact AR(1) variance eta sigma^2 / (h (2 - eta h)) shows the
   O(eta h) correction.
2. 2-D: independent coordinates with different noise levels have two
   temperatures (not Gibbs); per-coordinate learning rates eta'/sigma_i^2 give
   a single temperature (Gibbs), the lecture's "Langevin and RMSProp" slide.
3. The theorem, on a finite-sum 2-D quadratic with per-example Hessians: the
   stationary excess loss L(eta) - L(x*) from simulation and from the exact
   moment equations, and its slope at 0 against E_i ||g_i||^2 / 4.

Writes ``docs/figures/langevin_stationary.png``.  Run:
``python examples/langevin_stationary.py`` (about a minute on a loaded CPU).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

jax.config.update("jax_enable_x64", True)

FIG_DIR = os.path.join(os.path.dirname(__file__), "..", "docs", "figures")


def simulate_sgd(grad_fn, x0, learning_rate, key, *, num_chains=1000, num_steps=4000, burn_in=1000):
    """Run ``num_chains`` independent SGD chains with optax.sgd; return post-burn-in samples."""
    opt = optax.sgd(learning_rate)

    def chain(key):
        def body(carry, k):
            x, state = carry
            updates, state = opt.update(grad_fn(x, k), state)
            x = optax.apply_updates(x, updates)
            return (x, state), x

        _, xs = jax.lax.scan(body, (x0, opt.init(x0)), jax.random.split(key, num_steps))
        return xs[burn_in:]

    return jax.jit(jax.vmap(chain))(jax.random.split(key, num_chains))


def one_dimensional(h=1.0, sigma=1.0):
    print("1-D: L(x) = h x^2 / 2, per-example gradient h x - c_i, Var c_i = sigma^2")
    print("| eta | simulated Var x | exact AR(1) | Gibbs, alpha = 1/2 | fitted alpha |")
    print("|---|---|---|---|---|")
    # A finite "training set" of gradient offsets with mean 0 and variance sigma^2.
    c = jnp.asarray(np.array([-1.5, -0.5, 0.0, 0.5, 1.5]) / np.sqrt(1.0) * sigma)
    c = c / jnp.sqrt(jnp.mean(c**2)) * sigma

    def grad_fn(x, k):
        return h * x - c[jax.random.randint(k, (), 0, c.shape[0])]

    samples_at = {}
    for eta in (0.02, 0.05, 0.1, 0.2, 0.5):
        xs = simulate_sgd(grad_fn, jnp.zeros(()), eta, jax.random.key(1))
        var = float(jnp.var(xs))
        exact = eta * sigma**2 / (h * (2 - eta * h))
        gibbs = 0.5 * eta * sigma**2 / h
        print(f"| {eta:g} | {var:.5f} | {exact:.5f} | {gibbs:.5f} | {var * h / (eta * sigma**2):.3f} |")
        samples_at[eta] = np.asarray(xs).ravel()
    return samples_at


def two_temperatures(eta=0.05, sigmas=(1.0, 3.0)):
    print("\n2-D: L = (x^2 + y^2)/2, independent gradient noise sigma_x = 1, sigma_y = 3")
    sig = jnp.asarray(sigmas)

    def grad_fn(x, k):
        return x - sig * jax.random.choice(k, jnp.array([-1.0, 1.0]), (2,))

    plain = simulate_sgd(grad_fn, jnp.zeros(2), eta, jax.random.key(2))
    temps_plain = np.asarray(jnp.var(plain.reshape(-1, 2), axis=0))  # T_i = h_i Var_i, h_i = 1
    # Per-coordinate learning rates eta' / sigma_i^2 (optax.sgd with a vector learning rate).
    eta_prime = eta
    precond = simulate_sgd(grad_fn, jnp.zeros(2), eta_prime / sig**2, jax.random.key(3))
    temps_pre = np.asarray(jnp.var(precond.reshape(-1, 2), axis=0))
    print(f"plain SGD (eta = {eta}):            temperatures T_x = {temps_plain[0]:.4f}, T_y = {temps_plain[1]:.4f}"
          f"  (Langevin: {eta * sigmas[0]**2 / 2:.4f}, {eta * sigmas[1]**2 / 2:.4f})")
    print(f"eta_i = eta'/sigma_i^2 (eta' = {eta_prime}): temperatures T_x = {temps_pre[0]:.4f}, T_y = {temps_pre[1]:.4f}"
          f"  (Gibbs: both {eta_prime / 2:.4f})")


def finite_sum_problem(n=6, seed=3):
    rng = np.random.default_rng(seed)
    hs = []
    for _ in range(n):
        a = rng.standard_normal((2, 2))
        hs.append(a @ a.T + 0.5 * np.eye(2))
    hs = np.stack(hs)
    cs = rng.standard_normal((n, 2))
    h_bar = hs.mean(0)
    x_star = np.linalg.solve(h_bar, np.einsum("nij,nj->i", hs, cs) / n)
    return hs, cs, h_bar, x_star


def exact_stationary_excess_loss(hs, cs, h_bar, x_star, eta):
    """Solve the first- and second-moment fixed point of x' = (I - eta H_i) x + eta H_i c_i."""
    a = np.eye(2)[None] - eta * hs
    b = eta * np.einsum("nij,nj->ni", hs, cs)
    mean = np.linalg.solve(np.eye(2) - a.mean(0), b.mean(0))
    lin = np.mean([np.kron(ai, ai) for ai in a], axis=0)
    const = np.mean([np.outer(ai @ mean, bi) + np.outer(bi, ai @ mean) + np.outer(bi, bi) for ai, bi in zip(a, b)], 0)
    second = np.linalg.solve(np.eye(4) - lin, const.reshape(-1)).reshape(2, 2)
    cov = second - np.outer(mean, mean)
    d = mean - x_star
    return 0.5 * (d @ h_bar @ d + np.trace(h_bar @ cov))


def theorem():
    hs, cs, h_bar, x_star = finite_sum_problem()
    n = hs.shape[0]
    g = np.einsum("nij,nj->ni", hs, x_star - cs)
    quarter = 0.25 * np.mean(np.sum(g**2, axis=1))
    hs_j, cs_j = jnp.asarray(hs), jnp.asarray(cs)

    def grad_fn(x, k):
        i = jax.random.randint(k, (), 0, n)
        return hs_j[i] @ (x - cs_j[i])

    print("\nTheorem: dL/deta at 0 = E_i ||g_i||^2 / 4 on a 6-example 2-D quadratic (per-example Hessians)")
    print("| eta | simulated L(eta) - L* | exact L(eta) - L* | (L(eta) - L*)/eta |")
    print("|---|---|---|---|")
    etas = np.array([0.005, 0.01, 0.02, 0.04, 0.08])
    sims, exacts = [], []
    for eta in etas:
        xs = simulate_sgd(grad_fn, jnp.asarray(x_star), eta, jax.random.key(4), num_chains=400, num_steps=6000)
        d = xs - jnp.asarray(x_star)
        sim = float(jnp.mean(0.5 * jnp.einsum("...i,ij,...j->...", d, jnp.asarray(h_bar), d)))
        ex = exact_stationary_excess_loss(hs, cs, h_bar, x_star, eta)
        sims.append(sim)
        exacts.append(ex)
        print(f"| {eta:g} | {sim:.3e} | {ex:.3e} | {ex / eta:.4f} |")
    e1, e2 = 1e-5, 2e-5
    l1 = exact_stationary_excess_loss(hs, cs, h_bar, x_star, e1)
    l2 = exact_stationary_excess_loss(hs, cs, h_bar, x_star, e2)
    slope = (4 * l1 / e1 - l2 / e2) / 3
    # Least squares L = a eta + b eta^2 (through the origin) on the simulated points.
    design = np.stack([etas[:4], etas[:4] ** 2], axis=1)
    fit = np.linalg.lstsq(design, np.asarray(sims[:4]), rcond=None)[0]
    print(f"slope at 0 (exact moments, Richardson): {slope:.5f}")
    print(f"slope at 0 from simulations (fit a eta + b eta^2, eta <= 0.04): {fit[0]:.5f}")
    print(f"E_i ||g_i||^2 / 4: {quarter:.5f}")
    return etas, np.asarray(sims), np.asarray(exacts), quarter


def main():
    os.makedirs(FIG_DIR, exist_ok=True)
    samples = one_dimensional()
    two_temperatures()
    etas, sims, exacts, quarter = theorem()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    eta = 0.1
    xs = samples[eta]
    grid = np.linspace(xs.min(), xs.max(), 200)
    var_gibbs = 0.5 * eta
    axes[0].hist(xs, bins=80, density=True, alpha=0.5, label="SGD samples")
    axes[0].plot(grid, np.exp(-(grid**2) / (2 * var_gibbs)) / np.sqrt(2 * np.pi * var_gibbs), label="Gibbs, alpha = 1/2")
    axes[0].set_title(f"1-D stationary distribution, eta = {eta}")
    axes[0].legend()
    fine = np.linspace(0, etas.max(), 100)
    axes[1].plot(etas, sims, "o", label="simulated")
    axes[1].plot(etas, exacts, "-", label="exact moments")
    axes[1].plot(fine, quarter * fine, "--", label="E||g_i||^2/4 * eta")
    axes[1].set_xlabel("eta")
    axes[1].set_ylabel("L(eta) - L*")
    axes[1].set_title("McAllester's theorem")
    axes[1].legend()
    fig.tight_layout()
    out = os.path.join(FIG_DIR, "langevin_stationary.png")
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
