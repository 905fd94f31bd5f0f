"""Generated protobuf messages and services of package apportion.v1 (run `make proto`)."""
