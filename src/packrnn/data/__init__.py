"""Text data tooling: tokenizer, vocabulary, data sets, bucketing samplers, collate functions.

A typical pipeline (AG News CSV -> padded or packed batches of similar lengths)::

    from torch.utils.data import DataLoader
    from packrnn.data import BucketBatchSampler, Collate, load_text_classification

    train = load_text_classification("train.csv", format="agnews", min_freq=1)
    test = load_text_classification("test.csv", vocab=train.vocab, label_map=train.label_map)
    sampler = BucketBatchSampler(train.lengths, batch_size=32, seed=0)
    loader = DataLoader(train, batch_sampler=sampler, collate_fn=Collate(packed=True))
"""

from .collate import (IGNORE_INDEX, Batch, Collate, TokenBatch, TokenCollate, collate_packed,
                      collate_padded, collate_tokens)
from .datasets import (
    AG_NEWS_LABELS,
    FORMATS,
    BadRow,
    LabelMap,
    TextClassificationDataset,
    TextRecords,
    load_text_classification,
    read_agnews,
    read_csv,
    read_jsonl,
    read_records,
)
from .language_modeling import (LEVELS, LM_FORMATS, LM_SPECIALS, LanguageModelDataset,
                                load_language_modeling, read_texts)
from .samplers import BucketBatchSampler, DistributedBucketBatchSampler, PaddingStats, padding_waste
from .tagging import (TAGGING_FORMATS, TaggedRecords, TaggingDataset, load_tagging, read_conll,
                      read_conllu, read_tagged, read_tagged_jsonl)
from .tokenizer import Tokenizer, basic_english, get_tokenizer
from .vocab import Vocab, build_vocab_from_iterator

__all__ = [
    # tokenizer
    "Tokenizer",
    "basic_english",
    "get_tokenizer",
    # vocabulary
    "Vocab",
    "build_vocab_from_iterator",
    # data sets
    "AG_NEWS_LABELS",
    "FORMATS",
    "BadRow",
    "LabelMap",
    "TextRecords",
    "TextClassificationDataset",
    "read_agnews",
    "read_csv",
    "read_jsonl",
    "read_records",
    "load_text_classification",
    # batching
    "BucketBatchSampler",
    "DistributedBucketBatchSampler",
    "PaddingStats",
    "padding_waste",
    "Batch",
    "Collate",
    "collate_padded",
    "collate_packed",
    # per-token tasks: tagging and language modelling
    "TAGGING_FORMATS",
    "TaggedRecords",
    "TaggingDataset",
    "read_conllu",
    "read_conll",
    "read_tagged_jsonl",
    "read_tagged",
    "load_tagging",
    "LM_FORMATS",
    "LEVELS",
    "LM_SPECIALS",
    "LanguageModelDataset",
    "read_texts",
    "load_language_modeling",
    "IGNORE_INDEX",
    "TokenBatch",
    "TokenCollate",
    "collate_tokens",
]
