-- pmp.nn: neural-network building blocks. The functional part is here; modules build on it.
return {
  functional = require 'pmp.nn.functional',
}
