import torch

from r1tune.data.encode import IGNORE
from r1tune.train.sequence_scores import label_logps, last_token_states


def test_last_token_states_skips_padding_and_virtual_tokens():
    states = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)  # 2 virtual tokens + 4 positions
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_states(states, mask).flatten().tolist() == [4.0, 11.0]
    assert last_token_states(states[:, 2:], mask).flatten().tolist() == [4.0, 11.0]  # same tokens, no virtual ones


def test_label_logps_sums_only_labelled_next_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE, IGNORE, 3, 4, IGNORE], [IGNORE, 1, 2, 0, 6]])
    sums, counts = label_logps(logits, None, labels)
    logp = logits.log_softmax(-1)
    assert counts.tolist() == [2, 4]
    assert torch.allclose(sums[0], logp[0, 1, 3] + logp[0, 2, 4])
    assert torch.allclose(sums[1], logp[1, 0, 1] + logp[1, 1, 2] + logp[1, 2, 0] + logp[1, 3, 6])
