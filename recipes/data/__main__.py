"""A quick look at what the data pipeline yields: ``python -m recipes.data [data_files [valid_files]]``."""

import sys

from recipes.data import DataConfig, build_data

if __name__ == "__main__":
    args = sys.argv[1:]
    data = build_data(DataConfig(data_files=args[0] if args else None, valid_files=args[1] if len(args) > 1 else None))
    print(data.description)
    print(repr(data.tokenizer.decode(next(data.train)[0][:64].tolist())))
    print(data.train.state_dict())
