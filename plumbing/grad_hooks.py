"""Each prompt's exact gradient out of ONE forward+backward of many prompts (sketch_grads.py's
batched backward). A "group" is the responses of one prompt; the loss is the sum of the groups'."""

from __future__ import annotations

import contextlib
import itertools

import torch

from plumbing.cli import DataError


def group_runs(values: list[int]) -> list[tuple[int, slice]]:
    """(value, slice of its positions) for each run of equal consecutive values: each group's
    rows (views, no copies). Plain Python: it runs for every layer, where a tensor op's call costs
    more than the loop."""
    runs, start = [], 0
    for value, run in itertools.groupby(values):
        count = sum(1 for _ in run)
        runs.append((value, slice(start, start + count)))
        start += count
    return runs


def shared_prefix(sequences: list[list[int]]) -> int:
    """How many leading tokens all the sequences have in common (0 for a single one: nothing to
    share)."""
    if len(sequences) < 2:
        return 0
    columns = enumerate(zip(*sequences))
    return next((t for t, column in columns if len(set(column)) > 1), min(map(len, sequences)))


class GroupGradientHooks:
    """The backward gives every token's delta_t = dL/d(a layer's output); a group's gradient is the
    sum over its own tokens, taken per layer as the backward passes:
      W of a Linear / Conv1D, or of the LM head:   G_b = sum_{t in b} delta_t x_t^T
      an embedding E [V, H] (token v_t):            row v_t of G_b gets the output gradient g_t
      a bias:                                       sum_{t in b} delta_t
      a norm's weight gamma and bias beta:          sum_{t in b} g_t * dy_t/dgamma, sum_{t in b} g_t
    Each share goes to sink.add(groups, parameter, values, rows): values [len(groups), ...], each
    shaped like the parameter or (rows given) its rows `rows`; groups None: every group at once.
    The parameters are frozen while hooked: the backward computes no summed dW (nobody reads it).
    """

    def __init__(self, model, sink):
        from transformers.pytorch_utils import Conv1D

        self.model, self.sink, self.active, self.handles = model, sink, False, []
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        # many groups' G_b of a weight, handed over together, in the memory of one summed gradient
        numel, device = sum(p.numel() for p in self.parameters), self.parameters[0].device
        self.products = torch.empty(numel, device=device)
        self.head = model.get_output_embeddings()
        if getattr(self.head, "bias", None) is not None:
            raise DataError("--batched-backward: an LM head with a bias is not supported")
        self.exact, self.transposed = [], set()  # exact: summed per group, handed over at the end
        self.norm_rules = {}  # a norm module -> the function giving its parameters' shares
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if module is self.head or not own:
                continue
            if isinstance(module, (torch.nn.Linear, Conv1D)):  # Conv1D (GPT-2) stores [in, out]
                if isinstance(module, Conv1D):
                    self.transposed.add(id(module.weight))
                self.exact += [p for p in own if p is not module.weight]
                self.handles.append(module.register_forward_hook(self.linear_hook))
            elif isinstance(module, torch.nn.Embedding):
                self.handles.append(module.register_forward_hook(self.embedding_hook))
            elif (rule := norm_rule(module)) is not None:
                self.norm_rules[module] = rule
                self.exact += own
                self.handles.append(module.register_forward_hook(self.norm_hook))
            else:
                self.remove()  # the hooks registered so far
                raise DataError(f"--batched-backward has no rule for {name} ({type(module)})")
        self.handles.append(model.register_forward_hook(self.model_hook))
        for p in self.parameters:
            p.requires_grad_(False)

    @classmethod
    def attach(cls, model, sink, required: bool):
        """The hooks, or None (saying so) for a model with a module they have no rule for, unless
        they are required."""
        try:
            return cls(model, sink)
        except DataError as no_rule:
            if required:
                raise
            print(f"a backward per prompt: {no_rule}")
            return None

    def start(self, groups: int) -> None:
        device = self.parameters[0].device
        self.sums = {id(p): torch.zeros(groups, p.numel(), device=device) for p in self.exact}

    def finish(self) -> None:
        """Hand over the exact parameters' sums, every group at once."""
        for p in self.exact:
            self.sink.add(None, p, self.sums[id(p)])

    @contextlib.contextmanager
    def recording(self, row_group: list[int], row_ids: list[tuple[list[int], list[int]]]):
        """Within it, the forward of a micro-batch: row i, row_ids[i] = (prompt, response ids),
        belongs to group row_group[i] (its response tokens are those the LM head sees, in order)."""
        device = self.parameters[0].device
        self.row_group = torch.tensor(row_group, device=device)
        self.runs = group_runs(row_group)  # the same for every layer
        tokens = [[*prompt, *response] for prompt, response in row_ids]
        self.shared = [shared_prefix(tokens[rows]) for _, rows in self.runs]
        self.head_group = [g for g, (_, response) in zip(row_group, row_ids) for _ in response]
        self.head_seen, self.active, self.head_tap = 0, True, None
        try:
            yield
        finally:
            self.active = False
            if self.head_tap is not None:
                self.head_tap.__exit__(None, None, None)

    def add_matrix(self, weight, delta: torch.Tensor, x: torch.Tensor, runs, shared=None) -> None:
        """G_b = sum over group b's rows k and tokens t of delta_{k,t} x_{k,t}^T, in the weight's
        layout, for as many groups at a time as self.products holds; groups of equally many rows
        side by side form one batched product (a product per group costs more in calls than in
        arithmetic). The first shared[j] tokens of group j's rows are the same (a prompt's), so
        their x_t is too: there sum_k delta_{k,t} x_t^T = (sum_k delta_{k,t}) x_t^T, one product."""
        most = len(self.products) // weight.numel()
        for first in range(0, len(runs), most):
            some = runs[first : first + most]
            products = self.products[: len(some) * weight.numel()].view(len(some), *weight.shape)
            sizes = [rows.stop - rows.start for _, rows in some]
            for _, alike in group_runs(sizes):  # groups of equally many rows: one batched product
                rows = slice(some[alike][0][1].start, some[alike][-1][1].stop)
                count = alike.stop - alike.start
                d = delta[rows].float().unflatten(0, (count, -1))  # [groups, rows, tokens, out]
                inputs = x[rows].float().unflatten(0, (count, -1))
                common = min(shared[first + alike.start : first + alike.stop]) if shared else 0
                parts = [(d.flatten(1, 2), inputs.flatten(1, 2))]  # every row's every token
                if common:  # the shared tokens once, then each row's own
                    parts = [(d[:, :, :common].sum(1), inputs[:, 0, :common])]
                    parts += [(d[:, :, common:].flatten(1, 2), inputs[:, :, common:].flatten(1, 2))]
                torch.bmm(*self.factors(weight, *parts[0]), out=products[alike])
                for part in parts[1:]:
                    products[alike].baddbmm_(*self.factors(weight, *part))
            self.sink.add([group for group, _ in some], weight, products)

    def factors(self, weight, d: torch.Tensor, inputs: torch.Tensor) -> tuple:
        """delta^T x in the weight's layout as a (left, right) pair (Conv1D's is x^T delta)."""
        return (inputs.mT, d) if id(weight) in self.transposed else (d.mT, inputs)

    def linear_hook(self, module, args, output):
        if not self.active:  # gradient checkpointing re-runs the forward in the backward
            return
        x, row_group, runs, shared = args[0].detach(), self.row_group, self.runs, self.shared

        def backward(delta):
            self.add_matrix(module.weight, delta, x, runs, shared)
            if module.bias is not None:  # sum_t delta_t, per group
                self.sums[id(module.bias)].index_add_(0, row_group, delta.float().sum(1))

        output.register_hook(backward)

    def embedding_hook(self, module, args, output):
        if not self.active:
            return None
        ids, row_group, runs = args[0], self.row_group, self.runs
        if not output.requires_grad:  # the parameters are frozen: the backward starts here
            output.requires_grad_()
        if ids.shape[0] != len(row_group):  # one lookup for all rows (GPT-2's positions)
            ids, output = ids.expand(len(row_group), -1), output.expand(len(row_group), -1, -1)
        # torch gives the padding token's row no gradient: its tokens do not count
        counted = None if module.padding_idx is None else (ids != module.padding_idx)[..., None]

        def backward(grad):
            grad = grad.float() if counted is None else grad.float() * counted
            for group, rows in runs:
                rows_grad = grad[rows].reshape(-1, grad.shape[-1])
                self.sink.add([group], module.weight, rows_grad, rows=ids[rows].reshape(-1))

        output.register_hook(backward)
        return output

    def norm_hook(self, module, args, output):
        if not self.active:
            return
        x, row_group, shares = args[0].detach(), self.row_group, self.norm_rules[module]

        def backward(grad):  # each row's sum over its tokens, added to its group's
            for p, share in shares(module, x, grad.float()).items():
                self.sums[id(p)].index_add_(0, row_group, share.sum(1))

        output.register_hook(backward)

    def model_hook(self, module, args, output):
        """The LM head is applied after the model's forward as a function (common.head_logprobs),
        not as a module: a TorchFunctionMode sees those calls until the recording ends."""
        if self.active and self.head_tap is None:
            self.head_tap = HeadTap(self)
            self.head_tap.__enter__()

    def head_hook(self, ins: torch.Tensor, logits: torch.Tensor) -> None:
        """A chunk of response tokens through the head: ins = h_t / T [n, H], logits z_t [n, V]
        (their gradient is delta_t); the last chunk's padding tokens (no gradient) are left out."""
        token_group = self.head_group[self.head_seen : self.head_seen + len(ins)]
        real = len(token_group)
        self.head_seen += len(ins)
        ins = ins.detach()[:real, None]
        runs = group_runs(token_group)
        logits.register_hook(
            lambda delta: self.add_matrix(self.head.weight, delta[:real, None], ins, runs)
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for p in self.parameters:
            p.requires_grad_(True)


# ------------------------------------------- a norm's parameters: their gradient token by token
def layer_norm_shares(module, x, grad) -> dict:
    """LayerNorm, y = gamma * x_hat + beta with x_hat = (x - mean(x)) / std(x): g * x_hat, g."""
    x_hat = torch.nn.functional.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
    shares = {module.weight: grad * x_hat}
    return shares if module.bias is None else shares | {module.bias: grad}


def rms_normalized(module, x) -> torch.Tensor:
    """x / rms(x), rms(x) = sqrt(mean(x^2) + eps), as Llama's RMSNorm computes it (in float32,
    then in x's dtype)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    eps = torch.finfo(x.dtype).eps if eps is None else eps  # torch.nn.RMSNorm's default
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_shares(module, x, grad) -> dict:
    """RMSNorm, y = gamma * x / rms(x): g * x / rms(x)."""
    return {module.weight: grad * rms_normalized(module, x).float()}


def norm_rule(module):
    """layer_norm_shares or rms_norm_shares for a module that computes that norm (an RMSNorm is
    checked on random rows: Gemma's, (1 + gamma) * x / rms(x), is not this one); else None."""
    if isinstance(module, torch.nn.LayerNorm):
        return layer_norm_shares
    own, weight = list(module.parameters(recurse=False)), getattr(module, "weight", None)
    if not type(module).__name__.endswith("RMSNorm") or len(own) != 1 or own[0] is not weight:
        return None
    rows = torch.randn(2, weight.shape[-1], generator=torch.Generator().manual_seed(0))
    rows = rows.to(weight.device, weight.dtype)
    with torch.no_grad():
        same = torch.allclose(module(rows), weight * rms_normalized(module, rows))
    return rms_norm_shares if same else None


class HeadTap(torch.overrides.TorchFunctionMode):
    """Calls of F.linear with the LM head's weight go to GroupGradientHooks.head_hook."""

    def __init__(self, hooks: GroupGradientHooks):
        super().__init__()
        self.hooks = hooks

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.nn.functional.linear and args[1] is self.hooks.head.weight:
            self.hooks.head_hook(args[0], out)
        return out
