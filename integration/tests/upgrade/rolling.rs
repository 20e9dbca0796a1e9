// rolling upgrade: see below
