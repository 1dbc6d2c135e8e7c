--- pmp.data: tokenizers for raw text and GPT datasets.
return {
  tokenizers = require 'pmp.data.tokenizers',
  TextDataset = require 'pmp.data.text_dataset',
  tiny_corpus = require 'pmp.data.tiny_corpus',
  sft = require 'pmp.data.sft',
  sft_indexed = require 'pmp.data.sft_indexed',            -- pre-tokenized SFT samples and loss masks
  indexed = require 'pmp.data.indexed',                    -- Megatron .bin/.idx reader and builder
  gpt_dataset = require 'pmp.data.gpt_dataset',            -- GPTDataset, BlendedDataset, build()
  dataset_tokenizer = require 'pmp.data.dataset_tokenizer', -- the tokenizer recorded with preprocessed data
}
