-- pmp.data: tokenizers for raw text and GPT datasets.
return {
  tokenizers = require 'pmp.data.tokenizers',
  TextDataset = require 'pmp.data.text_dataset',
  tiny_corpus = require 'pmp.data.tiny_corpus',
}
