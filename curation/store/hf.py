"""The shard schema as Hugging Face `datasets` features, so a shard opens with PIL images and
typed columns in `datasets` without a cast.

Two forms of the same features, both derived from the Arrow schema (never a hand-kept column
list): the JSON that `datasets` reads from a Parquet file's schema metadata (key
`huggingface`), and the YAML list a dataset card's `dataset_info.features` holds. A struct of
exactly `bytes: binary` and `path: string` is how `datasets` stores an `Image`, so such a column
(`images`) becomes a list of `Image`. `datasets` itself is not imported: it is not needed to
write shards.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

METADATA_KEY = b"huggingface"
# Arrow's names where `datasets.Value` uses others.
_DTYPES = {"double": "float64", "float": "float32", "halffloat": "float16"}


def _is_image(t: pa.DataType) -> bool:
    return (pa.types.is_struct(t) and {t.field(i).name: t.field(i).type for i in range(t.num_fields)}
            == {"bytes": pa.binary(), "path": pa.string()})


def _value(t: pa.DataType) -> str:
    if pa.types.is_nested(t) or pa.types.is_dictionary(t):
        raise ValueError(f"no Hugging Face feature for Arrow type {t}")
    return _DTYPES.get(str(t), str(t))


def feature(t: pa.DataType) -> Any:
    """One Arrow type as a `datasets` feature in its JSON form (`Features.from_dict` reads it).
    A list is written `[feature]`, the form every `datasets` release reads.

    >>> feature(pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))
    [{'_type': 'Image'}]
    >>> feature(pa.struct([("role", pa.string()), ("n", pa.float64())]))
    {'role': {'dtype': 'string', '_type': 'Value'}, 'n': {'dtype': 'float64', '_type': 'Value'}}
    """
    if _is_image(t):
        return {"_type": "Image"}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return [feature(t.value_type)]
    if pa.types.is_struct(t):
        return {t.field(i).name: feature(t.field(i).type) for i in range(t.num_fields)}
    return {"dtype": _value(t), "_type": "Value"}


def hf_features(schema: pa.Schema) -> dict[str, Any]:
    """Every column of `schema` as `datasets` features (JSON form)."""
    return {f.name: feature(f.type) for f in schema}


def _yaml_type(t: pa.DataType) -> dict[str, Any]:
    """The type keys of one entry of a card's `dataset_info.features` (`datasets`' YAML form)."""
    if _is_image(t):
        return {"dtype": "image"}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _yaml_type(t.value_type)
        return {"list": inner["dtype"] if set(inner) == {"dtype"} else inner.get("struct", inner)}
    if pa.types.is_struct(t):
        return {"struct": [{"name": t.field(i).name, **_yaml_type(t.field(i).type)} for i in range(t.num_fields)]}
    return {"dtype": _value(t)}


def hf_yaml_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """`dataset_info.features` of a dataset card, as `datasets.Features._to_yaml_list` writes it.

    >>> hf_yaml_features(pa.schema([("id", pa.string()), ("tags", pa.list_(pa.string()))]))
    [{'name': 'id', 'dtype': 'string'}, {'name': 'tags', 'list': 'string'}]
    """
    return [{"name": f.name, **_yaml_type(f.type)} for f in schema]


def schema_with_hf_metadata(schema: pa.Schema) -> pa.Schema:
    """`schema` with the `huggingface` metadata `datasets` reads features from (other metadata kept)."""
    info = json.dumps({"info": {"features": hf_features(schema)}}, sort_keys=False).encode()
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: info})
