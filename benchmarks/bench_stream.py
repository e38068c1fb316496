"""Stream batching and the main job end to end, against the word-language-model example's loop.

1. Batch production: the seconds ``StreamBatches`` takes to lay out an epoch and hand out its batches, as a
   share of the seconds of training on them: the main job's single stream, and the ``pydoc_data`` topics as
   79 documents reshuffled every epoch (resets and masks included).
2. End to end: one training epoch of the main job (``StreamBatches``, ``carry_state=True``, ``TbpttLoss``)
   against the loop of PyTorch's word-language-model example (``batchify``, ``get_batch``, the hidden state
   detached between chunks, ``loss.item()`` per chunk), with the same model, optimizer, corpus and chunks, in
   interleaved rounds (A B A' ...), every contender set up anew each round; the loop runs twice per round,
   its second run the noise floor. Both lay out their data inside the timed run.

The word-language-model loop is written here from the example's description; it shares no code with
``ignite_tbptt``. After the rounds, one more epoch of each from the same start checks that they compute the
same parameters.

    python benchmarks/bench_stream.py            # the main job's sizes: LSTM(256), 32 rows x 200 steps, k1 = 25
    python benchmarks/bench_stream.py --quick    # toy sizes, one round
"""

import argparse
import copy
import statistics
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

import bench_common as bc
from ignite_tbptt import StreamBatches, TbpttLoss, create_supervised_tbptt_trainer
from ignite_tbptt.demo import CharLSTM, encode, sequence_loss


def pydoc_topics() -> List[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


# ---------------------------------------------------------------------------------------------------------
# The word-language-model example's loop.


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous()


def get_batch(source: torch.Tensor, i: int, bptt: int):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def wlm_epoch(model: nn.Module, optimizer, tokens: torch.Tensor, batch_size: int, bptt: int) -> float:
    train_data = batchify(tokens, batch_size)
    criterion = nn.CrossEntropyLoss()
    model.train()
    hidden, total_loss = None, 0.0
    for i in range(0, train_data.size(0) - 1, bptt):
        data, targets = get_batch(train_data, i, bptt)
        optimizer.zero_grad()
        output, hidden = model(data) if hidden is None else model(data, repackage_hidden(hidden))
        loss = criterion(output.view(-1, output.shape[-1]), targets)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    return total_loss


# ---------------------------------------------------------------------------------------------------------
# The main job's training epoch.


def main_job_epoch(model: nn.Module, optimizer, tokens: torch.Tensor, batch_size: int, seq_len: int, k1: int) -> float:
    batches = StreamBatches(tokens, batch_size, seq_len)
    trainer = create_supervised_tbptt_trainer(model, optimizer, sequence_loss, tbtt_step=k1, carry_state=True)
    TbpttLoss().attach(trainer, "loss")
    return trainer.run(batches).metrics["loss"]


def production_seconds(make: Callable[[], StreamBatches], repeats: int) -> float:
    """The fastest of ``repeats`` epochs of laying out and iterating the batches, a fresh layout each time."""
    best = float("inf")
    for epoch in range(repeats):
        batches = make()
        batches.set_epoch(epoch)
        start = time.perf_counter()
        for _ in batches:
            pass
        best = min(best, time.perf_counter() - start)
    return best


def run(args) -> str:
    texts = pydoc_topics()
    if args.quick:
        texts = [t[:400] for t in texts]
    stream = encode(["\n".join(texts)])
    documents = encode(texts)
    tokens = stream.train[0]
    torch.manual_seed(0)
    base = CharLSTM(len(stream.vocab), args.hidden)

    def fresh():
        model = copy.deepcopy(base)
        return model, torch.optim.Adam(model.parameters(), lr=3e-3)

    def contender(epoch_fn: Callable[..., Any], *sizes: int) -> Callable[[], Callable[[], Any]]:
        def setup():
            model, optimizer = fresh()
            return lambda: epoch_fn(model, optimizer, tokens, *sizes) and None  # timed here, not self-reported

        return setup

    loop = contender(wlm_epoch, args.batch_size, args.k1)
    contenders: Dict[str, Callable[[], Callable[[], Any]]] = {
        "word-language-model loop": loop,
        "ignite_tbptt main job": contender(main_job_epoch, args.batch_size, args.seq_len, args.k1),
        "word-language-model loop, again": loop,
    }
    times = bc.interleaved(contenders, args.rounds, lambda: None)
    first = next(iter(times))
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = [[name, f"{best[name]:.2f}", f"{best[name] / best[first]:.3f}", f"{median[name] / median[first]:.3f}"]
            for name in times]
    end_to_end = bc.markdown_table(["contender", "s/epoch", "ratio", "ratio of medians"], rows)

    (m1, o1), (m2, o2) = fresh(), fresh()
    wlm_epoch(m1, o1, tokens, args.batch_size, args.k1)
    main_job_epoch(m2, o2, tokens, args.batch_size, args.seq_len, args.k1)
    diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))

    train_s = best["ignite_tbptt main job"]
    production = {
        "one stream (the main job)": lambda: StreamBatches(tokens, args.batch_size, args.seq_len),
        f"{len(documents.train)} documents, shuffle=True": lambda: StreamBatches(
            documents.train, args.batch_size, args.seq_len, shuffle=True),
    }
    prod_rows = []
    for name, make in production.items():
        seconds = production_seconds(make, repeats=5)
        batches = make()
        prod_rows.append([name, len(batches), f"{seconds * 1e3:.1f}", f"{100 * seconds / train_s:.2f}%"])
    producing = bc.markdown_table(["data", "batches", "ms to lay out and iterate", "share of training"], prod_rows)

    return (
        f"Stream batching and the main job: {bc.describe_device(torch.device('cpu'))}{bc.load_note()}; "
        f"LSTM({args.hidden}) char-LM on pydoc_data ({len(tokens):,} training tokens), {args.batch_size} rows x "
        f"{args.seq_len} steps per batch, k1 = {args.k1}, Adam; malloc {args.malloc}\n\n"
        f"Batch production (fastest of 5 fresh layouts) against one training epoch ({train_s:.2f} s):\n\n"
        f"{producing}\n\nOne training epoch, fastest of {args.rounds} interleaved rounds:\n\n{end_to_end}\n\n"
        f"Same computation: the largest parameter difference after one epoch of each is {diff:.1e} (float32)."
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes, one round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5, --quick 1)")
    parser.add_argument("--hidden", type=int, default=None, help="LSTM hidden size (default 256, --quick 16)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=200)
    parser.add_argument("--k1", type=int, default=25)
    bc.add_malloc_argument(parser)
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.hidden = args.hidden or (16 if args.quick else 256)
    bc.resolve_malloc(args)
    print(run(args))


if __name__ == "__main__":
    main()
