"""Packed documents (megalite/data/packing.py and the per-document attention it feeds): Megatron's
three rules on the host, a packed sample's losses equal to each document run alone, the training
flags end to end, and the refusal of data without end-of-document tokens."""
import numpy as np
import pytest
import torch

from megalite.data.packing import Packing, check_documents_end_with_eod
from megalite.model.gpt import GPTModel
from megalite.training.arguments import parse_args
from tests.parallel.tp_harness import model_config

EOD = 9


def _batch(rows):
    tokens = torch.tensor(rows)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(tokens.shape),
            "position_ids": torch.arange(tokens.shape[1]).expand(tokens.shape)}


def test_megatrons_three_rules_on_the_inputs():
    packed = Packing(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True).apply(
        _batch([[5, EOD, 1, EOD, EOD, 2, 3, 4], [1, 2, 3, 4, 5, 6, 7, EOD]]))
    # Positions restart after each EOD; an EOD in the last position starts nothing.
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1, 0, 0, 1, 2], list(range(8))]
    # No loss where the input is the EOD.
    assert packed["loss_mask"].tolist() == [[1, 0, 1, 0, 0, 1, 1, 1], [1] * 7 + [0]]
    # The EOD belongs to the document it ends.
    assert packed["documents"].starts == ((0, 2, 4, 5), (0,))


def test_each_rule_alone_changes_only_its_own_field():
    batch = _batch([[5, EOD, 1, 2]])
    only_loss = Packing(EOD, eod_mask_loss=True).apply(batch)
    assert torch.equal(only_loss["position_ids"], batch["position_ids"]) and "documents" not in only_loss
    only_mask = Packing(EOD, reset_attention_mask=True).apply(batch)
    assert torch.equal(only_mask["loss_mask"], batch["loss_mask"]) and only_mask["documents"].starts == ((0, 2),)


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_a_packed_sample_computes_what_each_document_computes_alone(variant):
    """Per-token losses of a packed sample with the three flags equal those of every document run as
    its own sequence from position 0 (RoPE and learned positions alike).  Attention made peaked (large
    query/key weights) so that reading across a document boundary would move the loss."""
    config = model_config(variant, seq_length=24, max_position_embeddings=24, vocab_size=100)
    model = GPTModel(config)
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.self_attention.linear_qkv.weight.mul_(6.0)
    g = torch.Generator().manual_seed(5)
    text = torch.randint(0, EOD, (2, 25), generator=g)
    text[0, [4, 5, 13]] = EOD          # documents of 5, 1, 8 and 11 tokens
    text[1, [10]] = EOD
    batch = {"tokens": text[:, :-1], "labels": text[:, 1:], "loss_mask": torch.ones(2, 24),
             "position_ids": torch.arange(24).expand(2, 24)}
    packed = Packing(EOD, True, True, True).apply(batch)
    losses = model(packed["tokens"], packed["position_ids"], labels=packed["labels"], documents=packed["documents"])
    plain = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    for sample, starts in enumerate(packed["documents"].starts):
        bounds = list(starts) + [24]
        for begin, end in zip(bounds, bounds[1:]):
            alone = model(batch["tokens"][sample:sample + 1, begin:end], torch.arange(end - begin)[None],
                          labels=batch["labels"][sample:sample + 1, begin:end])
            torch.testing.assert_close(losses[sample, begin:end], alone[0], rtol=1e-5, atol=1e-5)
    # Without the flags the later documents read the earlier ones: the check above can fail.
    assert (plain[0, 6:] - losses[0, 6:]).abs().max() > 1e-3


class _Documents:
    def __init__(self, docs):
        self.docs = [np.array(d) for d in docs]

    def __len__(self):
        return len(self.docs)

    def get(self, index):
        return self.docs[index]


def test_data_without_end_of_document_tokens_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"none of the first 2 documents of --data-path x ends with the "
                                         r"end-of-document token 9; make the data with .*--append-eod"):
        check_documents_end_with_eod(_Documents([[1, 2], [3, 4]]), EOD, "--data-path x")
    check_documents_end_with_eod(_Documents([[1, 2], [3, EOD]]), EOD, "--data-path x")


def test_the_flags_parse_with_megatrons_names():
    data = parse_args(["--mock-data", "--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"])[3]
    assert data.reset_position_ids and data.reset_attention_mask and data.eod_mask_loss


def test_the_flags_on_real_data_need_the_tokenizer_that_names_the_eod():
    from megalite.config.settings import DataConfig
    from megalite.data.training_data import packing_from_config
    data = DataConfig(data_path=["corpus"], eod_mask_loss=True)
    with pytest.raises(ValueError, match="--eod-mask-loss needs the end-of-document token, which comes from "
                                         "--tokenizer-type"):
        packing_from_config(data, None, 100)
    mock = DataConfig(mock_data=True, eod_mask_loss=True)
    assert packing_from_config(mock, None, 100).eod == 99          # mock data: the last id
