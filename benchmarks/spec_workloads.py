"""The speculation benchmark's workloads: bundled chats (draft_model), and two copy-heavy ones for n-gram lookup.

- copy: "fix the typos in this text and repeat it", the text a chat reply from the bundled sample, its first 200
  characters already repeated. Kept from the first table; the demo model does not copy it (it never learnt to copy
  text from its context: it continues its own way, so lookups are mostly rejected).
- copy-own: the prompt holds a passage the model itself wrote after an opening line, then that opening again, so
  the model's continuation is in the prompt, as in an edit, a regeneration or a quote. The openings are Shakespeare's
  (the demo model's training corpus, scripts/train_demo_model.py). The model's continuation depends on the whole
  context, so the passage is written in the prompt's own shape: a first continuation of the opening alone, then the
  continuation of "opening + that + opening", which is the passage the prompt holds.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

SAMPLE = Path(__file__).parent.parent / "sloserve" / "bench" / "data" / "sharegpt_sample.json"
SEPARATOR = "\n\n"

PASSAGES = [
    """HAMLET.
To be, or not to be,--that is the question:--
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune
Or to take arms against a sea of troubles,
And by opposing end them?--To die,--to sleep,--
No more; and by a sleep to say we end
The heartache, and the thousand natural shocks
That flesh is heir to,--'tis a consummation
Devoutly to be wish'd. To die,--to sleep;--
To sleep! perchance to dream:--ay, there's the rub;
For in that sleep of death what dreams may come,
When we have shuffled off this mortal coil,
Must give us pause.""",
    """MACBETH.
She should have died hereafter;
There would have been a time for such a word.--
To-morrow, and to-morrow, and to-morrow,
Creeps in this petty pace from day to day
To the last syllable of recorded time;
And all our yesterdays have lighted fools
The way to dusty death. Out, out, brief candle!
Life's but a walking shadow; a poor player,
That struts and frets his hour upon the stage,
And then is heard no more: it is a tale
Told by an idiot, full of sound and fury,
Signifying nothing.""",
    """JAQUES.
All the world's a stage,
And all the men and women merely players;
They have their exits and their entrances;
And one man in his time plays many parts,
His acts being seven ages. At first the infant,
Mewling and puking in the nurse's arms.
And then the whining school-boy, with his satchel
And shining morning face, creeping like snail
Unwillingly to school. And then the lover,
Sighing like furnace, with a woeful ballad
Made to his mistress' eyebrow.""",
    """ANTONY.
Friends, Romans, countrymen, lend me your ears;
I come to bury Caesar, not to praise him.
The evil that men do lives after them;
The good is oft interred with their bones:
So let it be with Caesar. The noble Brutus
Hath told you Caesar was ambitious:
If it were so, it was a grievous fault;
And grievously hath Caesar answer'd it.
Here, under leave of Brutus and the rest,--
For Brutus is an honourable man;
So are they all, all honourable men,--
Come I to speak in Caesar's funeral.""",
    """ROMEO.
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun!--
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she:
Be not her maid, since she is envious;
Her vestal livery is but sick and green,
And none but fools do wear it; cast it off.--
It is my lady; O, it is my love!
O, that she knew she were!--""",
    """PORTIA.
The quality of mercy is not strain'd;
It droppeth as the gentle rain from heaven
Upon the place beneath: it is twice bless'd;
It blesseth him that gives and him that takes:
'Tis mightiest in the mightiest: it becomes
The throned monarch better than his crown;
His sceptre shows the force of temporal power,
The attribute to awe and majesty,
Wherein doth sit the dread and fear of kings.""",
    """GLOSTER.
Now is the winter of our discontent
Made glorious summer by this sun of York;
And all the clouds that lower'd upon our house
In the deep bosom of the ocean buried.
Now are our brows bound with victorious wreaths;
Our bruised arms hung up for monuments;
Our stern alarums chang'd to merry meetings,
Our dreadful marches to delightful measures.""",
    """KING HENRY.
Once more unto the breach, dear friends, once more;
Or close the wall up with our English dead!
In peace there's nothing so becomes a man
As modest stillness and humility:
But when the blast of war blows in our ears,
Then imitate the action of the tiger;
Stiffen the sinews, summon up the blood,
Disguise fair nature with hard-favour'd rage.""",
    """PROSPERO.
Our revels now are ended. These our actors,
As I foretold you, were all spirits, and
Are melted into air, into thin air:
And, like the baseless fabric of this vision,
The cloud-capp'd towers, the gorgeous palaces,
The solemn temples, the great globe itself,
Yea, all which it inherit, shall dissolve;
And, like this insubstantial pageant faded,
Leave not a rack behind.""",
    """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date:
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declin'd,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade
Nor lose possession of that fair thou owest.""",
]


def openings() -> list[str]:
    """Each passage's first two lines (speaker and first verse)."""
    return ["\n".join(p.split("\n")[:2]) + "\n" for p in PASSAGES]


def chats_and_copy() -> dict[str, list[str]]:
    convs = [c["conversations"] for c in json.loads(SAMPLE.read_text())]
    chats = [c[0]["value"] for c in convs]
    copy = [f"Fix the typos in this text and repeat it:\n{c[1]['value'][:400]}\nFixed text:\n{c[1]['value'][:200]}"
            for c in convs]
    return {"chats": chats, "copy": copy}


def copy_own_prompts(generate: Callable[[list[list[int]], int], list[list[int]]], starts: list[list[int]],
                     separator: list[int], length: int) -> list[list[int]]:
    """start + passage + separator + start, the passage the model's greedy continuation in that shape.

    `generate(prompts, max_tokens)` returns greedy output token ids (the target's own)."""
    first = generate(starts, length)
    passages = generate([s + p + separator + s for s, p in zip(starts, first)], length)
    return [s + p + separator + s for s, p in zip(starts, passages)]
