"""Small recurrent models for the tests, all following the (y_pred, hidden) protocol."""

import torch
from torch import nn


class SeqNet(nn.Module):
    """A fused nn.RNN / nn.GRU / nn.LSTM with a linear head."""

    def __init__(self, kind="LSTM", n_in=2, n_hidden=3, n_out=2, batch_first=False, layers=1):
        super().__init__()
        self.rnn = getattr(nn, kind)(n_in, n_hidden, num_layers=layers, batch_first=batch_first)
        self.head = nn.Linear(n_hidden, n_out)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(x, hidden)
        return self.head(out), hidden


class CellNet(nn.Module):
    """A step-wise GRUCell loop over a (time, batch, features) input, with a dict hidden state."""

    def __init__(self, n_in=2, n_hidden=3, n_out=2):
        super().__init__()
        self.cell, self.head = nn.GRUCell(n_in, n_hidden), nn.Linear(n_hidden, n_out)
        self.n_hidden = n_hidden

    def forward(self, x, hidden=None):
        h = x.new_zeros(x.shape[1], self.n_hidden) if hidden is None else hidden["h"]
        outs = []
        for x_t in x.unbind(0):
            h = self.cell(x_t, h)
            outs.append(self.head(h))
        return torch.stack(outs), {"h": h}


class TokenLM(nn.Module):
    """Embedding -> LSTM -> decoder over a vocabulary: two matrices off the state path."""

    def __init__(self, vocab=11, n_embed=3, n_hidden=4):
        super().__init__()
        self.embed, self.rnn, self.decode = nn.Embedding(vocab, n_embed), nn.LSTM(n_embed, n_hidden), nn.Linear(n_hidden, vocab)

    def forward(self, x, hidden=None):
        out, hidden = self.rnn(self.embed(x), hidden)
        return self.decode(out), hidden


def make_model(kind, seed=0, **kwargs):
    torch.manual_seed(seed)
    models = {"cell": CellNet, "tokens": TokenLM}
    model = models[kind](**kwargs) if kind in models else SeqNet(kind, **kwargs)
    return model.double()


def token_loss(y_pred, y):
    return nn.functional.cross_entropy(y_pred.reshape(-1, y_pred.shape[-1]), y.reshape(-1))


def make_tokens(T, batch=3, vocab=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (T + 1, batch), generator=g)
    return tokens[:-1], tokens[1:]


def make_data(T, batch=3, n_in=2, n_out=2, seed=1, batch_first=False):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, T) if batch_first else (T, batch)
    x = torch.randn(*shape, n_in, generator=g, dtype=torch.float64)
    y = torch.randn(*shape, n_out, generator=g, dtype=torch.float64)
    return x, y


def cpu_runs_bfloat16_lstm() -> bool:
    """Whether this CPU runs a fused ``nn.LSTM`` under bfloat16 autocast: oneDNN needs AVX-512 BF16 or AMX for it,
    and fails on an AVX2-only CPU ("could not create a primitive descriptor for the LSTM forward")."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(1, 1)(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True
