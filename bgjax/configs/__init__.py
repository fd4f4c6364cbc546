"""The training configs that ship with bgjax: `bgjax train --config NAME` loads `bgjax/configs/NAME.py`,
`bgjax configs` lists them. Each defines `get_config()`; the first line of its docstring says what it trains."""
