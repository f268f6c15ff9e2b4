"""Print the shell commands of the README's "Quick start" section, one per line."""
import re
import sys

text = open(sys.argv[1]).read()
section = re.search(r"^## Quick start\n(.*?)(?=^## )", text, re.S | re.M)
if not section:
    sys.exit("README.md has no '## Quick start' section")
for block in re.findall(r"```(?:bash|sh)\n(.*?)```", section.group(1), re.S):
    for line in block.strip().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            print(line.strip())
