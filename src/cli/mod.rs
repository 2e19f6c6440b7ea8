//! The `iotgw` command-line tool, as library code so it can be tested.
