-- pmp.chat_template: the chat-template interpreter, which lives in the tokenizer package
-- (lua/pmp/tokenizer/chat_template/). This name stays because recipes and REPL users reach it as
-- pmp.chat_template.
return require 'pmp.tokenizer.chat_template'
