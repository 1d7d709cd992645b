"""Chat prompts of many kinds for distilling a drafter on a chat model's own answers.

No corpus is needed: each kind of request (questions, instructions, writing, code, reasoning,
conversation, rewriting) is a few templates crossed with subjects. The held-out prompts use
subjects that no training prompt mentions, so acceptance measured on them is not memorised.
"""

from __future__ import annotations

import random
from typing import Dict, List

QUESTION_TEMPLATES = [
    "What is {}?",
    "Can you explain {} in simple terms?",
    "Why is {} important?",
    "How does {} work?",
    "Give me a short overview of {}.",
    "What are the main facts about {}?",
    "What should a beginner know about {}?",
    "Tell me something interesting about {}.",
]
QUESTION_SUBJECTS = [
    "photosynthesis", "the water cycle", "gravity", "the French Revolution", "inflation",
    "black holes", "the immune system", "volcanoes", "the internet", "democracy", "DNA",
    "climate change", "the Roman Empire", "electricity", "vaccines", "the stock market",
    "machine learning", "the moon landing", "earthquakes", "the human heart", "renewable energy",
    "the printing press", "bees", "the Great Wall of China", "the Pythagorean theorem", "rainbows",
    "compound interest", "the Renaissance", "plate tectonics", "coral reefs", "jazz music",
    "the Olympic Games", "antibiotics", "solar panels", "the speed of light", "tides",
    "the periodic table", "evolution", "the Silk Road", "supply and demand", "sleep",
    "the ozone layer", "nuclear energy", "the Amazon rainforest", "bitcoin", "the pyramids",
]
INSTRUCTION_TEMPLATES = [
    "Give me {n} tips for {}.",
    "How can I get better at {}?",
    "Write a step-by-step guide to {}.",
    "What are common mistakes people make when {}?",
    "Make a short checklist for {}.",
    "Explain how to start {}.",
]
INSTRUCTION_SUBJECTS = [
    "learning a new language", "saving money", "cooking rice", "running a marathon",
    "studying for exams", "writing a resume", "planting tomatoes", "public speaking",
    "staying focused at work", "cleaning a kitchen", "taking better photos", "making friends",
    "preparing for a job interview", "learning to swim", "organising a closet", "reading more books",
    "managing stress", "planning a birthday party", "training a puppy", "drinking more water",
    "packing for a trip", "baking bread", "keeping a journal", "learning guitar",
    "fixing a flat bicycle tire", "writing a thank-you note",
]
WRITING_TEMPLATES = [
    "Write a short poem about {}.",
    "Write a short story about {}.",
    "Write a friendly email to a colleague about {}.",
    "Write a product description for {}.",
    "Write a haiku about {}.",
    "Write a short speech about {}.",
    "Write a tweet about {}.",
]
WRITING_SUBJECTS = [
    "the ocean", "a rainy afternoon", "a lost cat", "autumn leaves", "a new coffee machine",
    "a team meeting next week", "friendship", "a robot learning to paint", "the city at night",
    "a mountain hike", "a birthday surprise", "winter mornings", "a reusable water bottle",
    "a library", "the first day of school", "a garden", "a train journey", "hope",
]
CODE_TEMPLATES = [
    "Write a Python function that {}.",
    "Write a JavaScript function that {}.",
    "How do I {} in Python?",
    "Write a short Python script that {}, with comments.",
    "Explain this task and write code for it: {}.",
]
CODE_SUBJECTS = [
    "reverses a string", "checks whether a number is prime", "counts the words in a text",
    "sorts a list of dictionaries by a key", "reads a CSV file and prints each row",
    "computes the factorial of a number", "finds the largest element in a list",
    "removes duplicates from a list", "converts Celsius to Fahrenheit",
    "checks whether a string is a palindrome", "merges two sorted lists",
    "returns the Fibonacci numbers up to n", "counts the vowels in a string",
    "flattens a nested list", "validates an email address with a regular expression",
    "computes the average of a list of numbers", "writes a dictionary to a JSON file",
    "finds the most common word in a text", "generates a random password",
    "implements binary search",
]
REASONING_PROMPTS = [
    "If a train travels {a} km in {b} hours, what is its average speed?",
    "What is {a} plus {b}? Explain your steps.",
    "A shop sells apples for {a} cents each. How much do {b} apples cost?",
    "What is {a} times {b}?",
    "If I have {a} books and give away {b}, how many are left?",
    "Is {a} an even or an odd number? Why?",
]
CHAT_PROMPTS = [
    "Hi! How are you today?", "Can you recommend a good book?", "I'm bored. Any ideas?",
    "What's your favourite season and why?", "Tell me a joke.", "Good morning!",
    "What should I cook for dinner tonight?", "Can you help me plan my weekend?",
    "I feel nervous about my exam tomorrow.", "What are some fun hobbies to try?",
    "Who are you?", "What can you do?", "Tell me a fun fact.", "Thanks for your help!",
    "Can you suggest a name for my new dog?", "What's a good movie for a family night?",
]
REWRITE_TEMPLATES = [
    "Summarize in one sentence: {}",
    "Rewrite this more formally: {}",
    "Translate to simple English: {}",
    "Fix the grammar: {}",
]
REWRITE_TEXTS = [
    "the meeting was moved to friday because many people was on holiday",
    "Our new app lets users track their daily habits and see progress over time.",
    "i dont think we should go outside today its raining a lot",
    "The company reported higher profits this year thanks to strong sales abroad.",
    "She has been working on the project for three months and it is nearly finished.",
    "we need more chairs for the party can you bring some",
    "Regular exercise improves mood, sleep and overall health.",
    "the library will close early tomorrow for maintenance",
]

HELDOUT = [
    "What is the theory of relativity?",
    "Can you explain how a refrigerator works?",
    "Why do leaves change colour in autumn?",
    "Give me 3 tips for learning to draw.",
    "How can I get better at chess?",
    "Write a short poem about the desert.",
    "Write a friendly email inviting a friend to a picnic.",
    "Write a Python function that counts how many times each character appears in a string.",
    "Write a JavaScript function that capitalizes every word in a sentence.",
    "How do I read a text file line by line in Python?",
    "What is 17 plus 25? Explain your steps.",
    "If a car travels 150 km in 3 hours, what is its average speed?",
    "Can you recommend a board game for four players?",
    "What should I pack for a beach holiday?",
    "Summarize in one sentence: The museum added a new wing for modern art, which opens next month.",
    "Rewrite this more formally: hey can u send me the report by tomorrow",
    "What is the difference between weather and climate?",
    "Explain how vaccines train the immune system, briefly.",
    "Write a haiku about snow.",
    "Write a Python script that prints the multiplication table from 1 to 10.",
    "What are the benefits of walking every day?",
    "Tell me a short story about a dragon who is afraid of the dark.",
    "How do airplanes stay in the air?",
    "Write a SQL query that selects all users older than 30 from a table named users.",
]


def training_prompts(count: int = 600, seed: int = 0) -> List[str]:
    """`count` distinct prompts, a balanced mix of every kind, shuffled."""
    rng = random.Random(seed)
    kinds: Dict[str, List[str]] = {
        "question": [t.format(s) for t in QUESTION_TEMPLATES for s in QUESTION_SUBJECTS],
        "instruction": [
            t.format(s, n=rng.choice([3, 4, 5])) for t in INSTRUCTION_TEMPLATES for s in INSTRUCTION_SUBJECTS
        ],
        "writing": [t.format(s) for t in WRITING_TEMPLATES for s in WRITING_SUBJECTS],
        "code": [t.format(s) for t in CODE_TEMPLATES for s in CODE_SUBJECTS],
        "reasoning": [
            t.format(a=rng.randint(2, 90), b=rng.randint(2, 12)) for t in REASONING_PROMPTS for _ in range(8)
        ],
        "chat": list(CHAT_PROMPTS),
        "rewrite": [t.format(s) for t in REWRITE_TEMPLATES for s in REWRITE_TEXTS],
    }
    heldout = set(HELDOUT)
    for prompts in kinds.values():
        rng.shuffle(prompts)
    # Round-robin over the kinds, so every prefix of the list is balanced.
    mixed: List[str] = []
    while len(mixed) < count and any(kinds.values()):
        for prompts in kinds.values():
            while prompts:
                p = prompts.pop()
                if p not in heldout and p not in mixed:
                    mixed.append(p)
                    break
    return mixed[:count]


def heldout_prompts() -> List[str]:
    return list(HELDOUT)
