"""Write the mini-study's bundled data (deterministic; re-running it reproduces the files byte for byte).

    python benchmarks/mini_study/make_data.py            # rewrite the bundled files
    python benchmarks/mini_study/make_data.py --check    # exit 1 if they differ from what this writes

Two families of task types, from hand-written parallel lexicons in en / fr / es / de:
- "qa" (set A and the similar phase-2 set): arithmetic, larger number, day / month before or after,
  antonyms, colours of things, capitals, numbers in words. Answers are short full sentences.
- "manip" (the dissimilar phase-2 set): sort words, reverse a list, repeat a word, capital
  letters, count words, last word, spell a word. Different task types, the same languages.

Every item belongs to a train split or a held-out split of whole facts (an antonym pair both ways, a
pair of neighbouring days or months both ways, a sum or difference with all its numbers), so the
evaluation sets never contain a training fact in another form. Free-answer evaluation items whose
answer already appears in the prompt are left out (they would score an echo as right). Each phase-2 example has an id shared with
its English version (`*_en.jsonl`), the prompts for generative replay and the examples of English
replay.

Outputs:
  cft_adapters/data/mini/{en_tasks,similar,dissimilar,similar_en,dissimilar_en}.jsonl   (training)
  lm_eval_tasks/cft_mini/data/{en_mc,en_qa,ml_fr,ml_es,ml_de}.jsonl                   (evaluation)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN_DIR = ROOT / "cft_adapters" / "data" / "mini"
EVAL_DIR = ROOT / "lm_eval_tasks" / "cft_mini" / "data"
LANGS = ("fr", "es", "de")
ALL = ("en", *LANGS)

# ---------------------------------------------------------------------------------------------
# lexicons (en, fr, es, de)
# ---------------------------------------------------------------------------------------------

DAYS = {
    "en": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "fr": ["lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"],
    "es": ["lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"],
    "de": ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"],
}
MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto", "septiembre", "octubre",
           "noviembre", "diciembre"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September", "Oktober",
           "November", "Dezember"],
}
NUMBER_WORDS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf", "dix", "onze", "douze",
           "treize", "quatorze", "quinze", "seize", "dix-sept", "dix-huit", "dix-neuf", "vingt"],
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez", "once", "doce",
           "trece", "catorce", "quince", "dieciséis", "diecisiete", "dieciocho", "diecinueve", "veinte"],
    "de": ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf", "zwölf",
           "dreizehn", "vierzehn", "fünfzehn", "sechzehn", "siebzehn", "achtzehn", "neunzehn", "zwanzig"],
}
# (en, fr, es, de) pairs of opposites
ANTONYMS = [
    (("big", "small"), ("grand", "petit"), ("grande", "pequeño"), ("groß", "klein")),
    (("hot", "cold"), ("chaud", "froid"), ("caliente", "frío"), ("heiß", "kalt")),
    (("fast", "slow"), ("rapide", "lent"), ("rápido", "lento"), ("schnell", "langsam")),
    (("long", "short"), ("long", "court"), ("largo", "corto"), ("lang", "kurz")),
    (("young", "old"), ("jeune", "vieux"), ("joven", "viejo"), ("jung", "alt")),
    (("happy", "sad"), ("heureux", "triste"), ("feliz", "triste"), ("glücklich", "traurig")),
    (("light", "dark"), ("clair", "sombre"), ("claro", "oscuro"), ("hell", "dunkel")),
    (("high", "low"), ("haut", "bas"), ("alto", "bajo"), ("hoch", "niedrig")),
    (("full", "empty"), ("plein", "vide"), ("lleno", "vacío"), ("voll", "leer")),
    (("open", "closed"), ("ouvert", "fermé"), ("abierto", "cerrado"), ("offen", "geschlossen")),
    (("strong", "weak"), ("fort", "faible"), ("fuerte", "débil"), ("stark", "schwach")),
    (("rich", "poor"), ("riche", "pauvre"), ("rico", "pobre"), ("reich", "arm")),
    (("easy", "difficult"), ("facile", "difficile"), ("fácil", "difícil"), ("leicht", "schwierig")),
    (("early", "late"), ("tôt", "tard"), ("temprano", "tarde"), ("früh", "spät")),
    (("wet", "dry"), ("mouillé", "sec"), ("mojado", "seco"), ("nass", "trocken")),
    (("clean", "dirty"), ("propre", "sale"), ("limpio", "sucio"), ("sauber", "schmutzig")),
    (("good", "bad"), ("bon", "mauvais"), ("bueno", "malo"), ("gut", "schlecht")),
    (("true", "false"), ("vrai", "faux"), ("verdadero", "falso"), ("wahr", "falsch")),
    (("thick", "thin"), ("épais", "mince"), ("grueso", "delgado"), ("dick", "dünn")),
    (("cheap", "expensive"), ("bon marché", "cher"), ("barato", "caro"), ("billig", "teuer")),
    (("soft", "hard"), ("doux", "dur"), ("blando", "duro"), ("weich", "hart")),
]
# thing -> colour, with the article and agreement each language needs
COLOURS = [
    {"en": ("the sky", "blue"), "fr": ("le ciel", "bleu"), "es": ("el cielo", "azul"), "de": ("der Himmel", "blau")},
    {"en": ("grass", "green"), "fr": ("l'herbe", "verte"), "es": ("la hierba", "verde"), "de": ("das Gras", "grün")},
    {"en": ("snow", "white"), "fr": ("la neige", "blanche"), "es": ("la nieve", "blanca"), "de": ("der Schnee", "weiß")},
    {"en": ("coal", "black"), "fr": ("le charbon", "noir"), "es": ("el carbón", "negro"), "de": ("die Kohle", "schwarz")},
    {"en": ("a banana", "yellow"), "fr": ("la banane", "jaune"), "es": ("el plátano", "amarillo"), "de": ("die Banane", "gelb")},
    {"en": ("blood", "red"), "fr": ("le sang", "rouge"), "es": ("la sangre", "roja"), "de": ("das Blut", "rot")},
    {"en": ("a strawberry", "red"), "fr": ("la fraise", "rouge"), "es": ("la fresa", "roja"), "de": ("die Erdbeere", "rot")},
    {"en": ("a lemon", "yellow"), "fr": ("le citron", "jaune"), "es": ("el limón", "amarillo"), "de": ("die Zitrone", "gelb")},
    {"en": ("milk", "white"), "fr": ("le lait", "blanc"), "es": ("la leche", "blanca"), "de": ("die Milch", "weiß")},
    {"en": ("a tomato", "red"), "fr": ("la tomate", "rouge"), "es": ("el tomate", "rojo"), "de": ("die Tomate", "rot")},
    {"en": ("a carrot", "orange"), "fr": ("la carotte", "orange"), "es": ("la zanahoria", "naranja"), "de": ("die Karotte", "orange")},
    {"en": ("chocolate", "brown"), "fr": ("le chocolat", "marron"), "es": ("el chocolate", "marrón"), "de": ("die Schokolade", "braun")},
    {"en": ("a leaf", "green"), "fr": ("la feuille", "verte"), "es": ("la hoja", "verde"), "de": ("das Blatt", "grün")},
    {"en": ("a cloud", "white"), "fr": ("le nuage", "blanc"), "es": ("la nube", "blanca"), "de": ("die Wolke", "weiß")},
]
COLOUR_WORDS = {
    "en": ["blue", "green", "white", "black", "yellow", "red", "orange", "brown"],
    "fr": ["bleu", "vert", "blanc", "noir", "jaune", "rouge", "orange", "marron"],
    "es": ["azul", "verde", "blanco", "negro", "amarillo", "rojo", "naranja", "marrón"],
    "de": ["blau", "grün", "weiß", "schwarz", "gelb", "rot", "orange", "braun"],
}
# (country phrase as used after "capital of" in each language, capital in each language)
CAPITALS = [
    {"en": ("France", "Paris"), "fr": ("de la France", "Paris"), "es": ("de Francia", "París"), "de": ("von Frankreich", "Paris")},
    {"en": ("Germany", "Berlin"), "fr": ("de l'Allemagne", "Berlin"), "es": ("de Alemania", "Berlín"), "de": ("von Deutschland", "Berlin")},
    {"en": ("Spain", "Madrid"), "fr": ("de l'Espagne", "Madrid"), "es": ("de España", "Madrid"), "de": ("von Spanien", "Madrid")},
    {"en": ("Italy", "Rome"), "fr": ("de l'Italie", "Rome"), "es": ("de Italia", "Roma"), "de": ("von Italien", "Rom")},
    {"en": ("Japan", "Tokyo"), "fr": ("du Japon", "Tokyo"), "es": ("de Japón", "Tokio"), "de": ("von Japan", "Tokio")},
    {"en": ("the United Kingdom", "London"), "fr": ("du Royaume-Uni", "Londres"), "es": ("del Reino Unido", "Londres"), "de": ("vom Vereinigten Königreich", "London")},
    {"en": ("Portugal", "Lisbon"), "fr": ("du Portugal", "Lisbonne"), "es": ("de Portugal", "Lisboa"), "de": ("von Portugal", "Lissabon")},
    {"en": ("Russia", "Moscow"), "fr": ("de la Russie", "Moscou"), "es": ("de Rusia", "Moscú"), "de": ("von Russland", "Moskau")},
    {"en": ("Greece", "Athens"), "fr": ("de la Grèce", "Athènes"), "es": ("de Grecia", "Atenas"), "de": ("von Griechenland", "Athen")},
    {"en": ("Egypt", "Cairo"), "fr": ("de l'Égypte", "Le Caire"), "es": ("de Egipto", "El Cairo"), "de": ("von Ägypten", "Kairo")},
    {"en": ("China", "Beijing"), "fr": ("de la Chine", "Pékin"), "es": ("de China", "Pekín"), "de": ("von China", "Peking")},
    {"en": ("Poland", "Warsaw"), "fr": ("de la Pologne", "Varsovie"), "es": ("de Polonia", "Varsovia"), "de": ("von Polen", "Warschau")},
    {"en": ("Austria", "Vienna"), "fr": ("de l'Autriche", "Vienne"), "es": ("de Austria", "Viena"), "de": ("von Österreich", "Wien")},
    {"en": ("Belgium", "Brussels"), "fr": ("de la Belgique", "Bruxelles"), "es": ("de Bélgica", "Bruselas"), "de": ("von Belgien", "Brüssel")},
    {"en": ("the Netherlands", "Amsterdam"), "fr": ("des Pays-Bas", "Amsterdam"), "es": ("de los Países Bajos", "Ámsterdam"), "de": ("von den Niederlanden", "Amsterdam")},
    {"en": ("Canada", "Ottawa"), "fr": ("du Canada", "Ottawa"), "es": ("de Canadá", "Ottawa"), "de": ("von Kanada", "Ottawa")},
    {"en": ("Sweden", "Stockholm"), "fr": ("de la Suède", "Stockholm"), "es": ("de Suecia", "Estocolmo"), "de": ("von Schweden", "Stockholm")},
    {"en": ("Norway", "Oslo"), "fr": ("de la Norvège", "Oslo"), "es": ("de Noruega", "Oslo"), "de": ("von Norwegen", "Oslo")},
    {"en": ("Ireland", "Dublin"), "fr": ("de l'Irlande", "Dublin"), "es": ("de Irlanda", "Dublín"), "de": ("von Irland", "Dublin")},
    {"en": ("Hungary", "Budapest"), "fr": ("de la Hongrie", "Budapest"), "es": ("de Hungría", "Budapest"), "de": ("von Ungarn", "Budapest")},
]
NOUNS = {
    "en": ["cat", "dog", "house", "tree", "apple", "book", "water", "bread", "flower", "car", "bird", "fish", "table",
           "chair", "window", "door", "city", "moon", "river", "mountain", "horse", "cheese", "school", "garden"],
    "fr": ["chat", "chien", "maison", "arbre", "pomme", "livre", "eau", "pain", "fleur", "voiture", "oiseau", "poisson",
           "table", "chaise", "fenêtre", "porte", "ville", "lune", "rivière", "montagne", "cheval", "fromage", "école",
           "jardin"],
    "es": ["gato", "perro", "casa", "árbol", "manzana", "libro", "agua", "pan", "flor", "coche", "pájaro", "pez", "mesa",
           "silla", "ventana", "puerta", "ciudad", "luna", "río", "montaña", "caballo", "queso", "escuela", "jardín"],
    "de": ["Katze", "Hund", "Haus", "Baum", "Apfel", "Buch", "Wasser", "Brot", "Blume", "Auto", "Vogel", "Fisch", "Tisch",
           "Stuhl", "Fenster", "Tür", "Stadt", "Mond", "Fluss", "Berg", "Pferd", "Käse", "Schule", "Garten"],
}
SENTENCES = [
    {"en": "The cat is sleeping.", "fr": "Le chat dort.", "es": "El gato duerme.", "de": "Die Katze schläft."},
    {"en": "The dog runs in the garden.", "fr": "Le chien court dans le jardin.", "es": "El perro corre en el jardín.", "de": "Der Hund läuft im Garten."},
    {"en": "I drink a glass of water.", "fr": "Je bois un verre d'eau.", "es": "Bebo un vaso de agua.", "de": "Ich trinke ein Glas Wasser."},
    {"en": "We are going to the market tomorrow.", "fr": "Nous allons au marché demain.", "es": "Vamos al mercado mañana.", "de": "Wir gehen morgen auf den Markt."},
    {"en": "The children play in the park.", "fr": "Les enfants jouent dans le parc.", "es": "Los niños juegan en el parque.", "de": "Die Kinder spielen im Park."},
    {"en": "My sister reads a book.", "fr": "Ma sœur lit un livre.", "es": "Mi hermana lee un libro.", "de": "Meine Schwester liest ein Buch."},
    {"en": "The train leaves at eight.", "fr": "Le train part à huit heures.", "es": "El tren sale a las ocho.", "de": "Der Zug fährt um acht Uhr ab."},
    {"en": "It is raining today.", "fr": "Il pleut aujourd'hui.", "es": "Hoy llueve.", "de": "Heute regnet es."},
    {"en": "The soup is very hot.", "fr": "La soupe est très chaude.", "es": "La sopa está muy caliente.", "de": "Die Suppe ist sehr heiß."},
    {"en": "My father works in an office.", "fr": "Mon père travaille dans un bureau.", "es": "Mi padre trabaja en una oficina.", "de": "Mein Vater arbeitet in einem Büro."},
    {"en": "The bird sings in the tree.", "fr": "L'oiseau chante dans l'arbre.", "es": "El pájaro canta en el árbol.", "de": "Der Vogel singt im Baum."},
    {"en": "We eat bread and cheese.", "fr": "Nous mangeons du pain et du fromage.", "es": "Comemos pan y queso.", "de": "Wir essen Brot und Käse."},
    {"en": "The door of the house is open.", "fr": "La porte de la maison est ouverte.", "es": "La puerta de la casa está abierta.", "de": "Die Tür des Hauses ist offen."},
    {"en": "She writes a letter to her friend.", "fr": "Elle écrit une lettre à son amie.", "es": "Ella escribe una carta a su amiga.", "de": "Sie schreibt einen Brief an ihre Freundin."},
    {"en": "The shop closes at six.", "fr": "Le magasin ferme à six heures.", "es": "La tienda cierra a las seis.", "de": "Der Laden schließt um sechs Uhr."},
    {"en": "The coffee is ready.", "fr": "Le café est prêt.", "es": "El café está listo.", "de": "Der Kaffee ist fertig."},
]

# ---------------------------------------------------------------------------------------------
# task templates: each returns (prompt, answer, reference) in one language; `reference` is the
# short string the evaluation looks for in a model's answer
# ---------------------------------------------------------------------------------------------


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def arithmetic(lang: str, a: int, b: int, op: str) -> tuple[str, str, str]:
    value = a + b if op == "+" else a - b
    word = {"en": ("plus", "minus"), "fr": ("plus", "moins"), "es": ("más", "menos"), "de": ("plus", "minus")}[lang][op == "-"]
    return {
        "en": (f"What is {a} {word} {b}?", f"{a} {word} {b} is {value}."),
        "fr": (f"Combien font {a} {word} {b} ?", f"{a} {word} {b} font {value}."),
        "es": (f"¿Cuánto es {a} {word} {b}?", f"{a} {word} {b} es {value}."),
        "de": (f"Was ist {a} {word} {b}?", f"{a} {word} {b} ist {value}."),
    }[lang] + (str(value),)


def larger(lang: str, a: int, b: int) -> tuple[str, str, str]:
    big, small = max(a, b), min(a, b)
    return {
        "en": (f"Which number is larger, {a} or {b}?", f"{big} is larger than {small}."),
        "fr": (f"Quel nombre est le plus grand, {a} ou {b} ?", f"{big} est plus grand que {small}."),
        "es": (f"¿Qué número es mayor, {a} o {b}?", f"{big} es mayor que {small}."),
        "de": (f"Welche Zahl ist größer, {a} oder {b}?", f"{big} ist größer als {small}."),
    }[lang] + (str(big),)


def day(lang: str, i: int, after: bool) -> tuple[str, str, str]:
    d, other = DAYS[lang][i], DAYS[lang][(i + (1 if after else -1)) % 7]
    en_de = {"en": ("after", "before"), "fr": ("après", "avant"), "es": ("después del", "antes del"), "de": ("nach", "vor")}
    rel = en_de[lang][0 if after else 1]
    return {
        "en": (f"What day comes {rel} {d}?", f"The day {rel} {d} is {other}."),
        "fr": (f"Quel jour vient {rel} {d} ?", f"Le jour {rel} {d} est {other}."),
        "es": (f"¿Qué día viene {rel} {d}?", f"El día {rel} {d} es el {other}."),
        "de": (f"Welcher Tag kommt {rel} {d}?", f"Der Tag {rel} {d} ist {other}."),
    }[lang] + (other,)


def month(lang: str, i: int, after: bool) -> tuple[str, str, str]:
    m, other = MONTHS[lang][i], MONTHS[lang][(i + (1 if after else -1)) % 12]
    rels = {"en": ("after", "before"), "fr": ("après", "avant"), "es": ("después de", "antes de"), "de": ("nach", "vor")}
    rel = rels[lang][0 if after else 1]
    return {
        "en": (f"What month comes {rel} {m}?", f"The month {rel} {m} is {other}."),
        "fr": (f"Quel mois vient {rel} {m} ?", f"Le mois {rel} {m} est {other}."),
        "es": (f"¿Qué mes viene {rel} {m}?", f"El mes {rel} {m} es {other}."),
        "de": (f"Welcher Monat kommt {rel} {m}?", f"Der Monat {rel} {m} ist {other}."),
    }[lang] + (other,)


def antonym(lang: str, i: int, flip: bool) -> tuple[str, str, str]:
    pair = ANTONYMS[i][ALL.index(lang)]
    word, opposite = (pair[1], pair[0]) if flip else pair
    return {
        "en": (f'What is the opposite of "{word}"?', f'The opposite of "{word}" is "{opposite}".'),
        "fr": (f"Quel est le contraire de « {word} » ?", f"Le contraire de « {word} » est « {opposite} »."),
        "es": (f"¿Cuál es el contrario de «{word}»?", f"El contrario de «{word}» es «{opposite}»."),
        "de": (f"Was ist das Gegenteil von „{word}“?", f"Das Gegenteil von „{word}“ ist „{opposite}“."),
    }[lang] + (opposite,)


def colour(lang: str, i: int) -> tuple[str, str, str]:
    thing, col = COLOURS[i][lang]
    return {
        "en": (f"What colour is {thing}?", f"{cap(thing)} is {col}."),
        "fr": (f"De quelle couleur est {thing} ?", f"{cap(thing)} est {col}."),
        "es": (f"¿De qué color es {thing}?", f"{cap(thing)} es {col}."),
        "de": (f"Welche Farbe hat {thing}?", f"{cap(thing)} ist {col}."),
    }[lang] + (col,)


def capital(lang: str, i: int) -> tuple[str, str, str]:
    country, city = CAPITALS[i][lang]
    return {
        "en": (f"What is the capital of {country}?", f"The capital of {country} is {city}."),
        "fr": (f"Quelle est la capitale {country} ?", f"La capitale {country} est {city}."),
        "es": (f"¿Cuál es la capital {country}?", f"La capital {country} es {city}."),
        "de": (f"Was ist die Hauptstadt {country}?", f"Die Hauptstadt {country} ist {city}."),
    }[lang] + (city,)


def number_word(lang: str, n: int) -> tuple[str, str, str]:
    word = NUMBER_WORDS[lang][n]
    return {
        "en": (f"Write the number {n} in words.", f"{n} is written {word}."),
        "fr": (f"Écris le nombre {n} en lettres.", f"{n} s'écrit {word}."),
        "es": (f"Escribe el número {n} con letras.", f"{n} se escribe {word}."),
        "de": (f"Schreibe die Zahl {n} in Worten.", f"{n} schreibt man {word}."),
    }[lang] + (word,)


def _fold(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", word.casefold()) if unicodedata.category(c) != "Mn")


def sort_words(lang: str, idx: tuple[int, ...]) -> tuple[str, str, str]:
    words = [NOUNS[lang][i] for i in idx]
    out = ", ".join(sorted(words, key=_fold))
    listed = ", ".join(words)
    return {
        "en": (f"Sort these words alphabetically: {listed}.", out),
        "fr": (f"Trie ces mots par ordre alphabétique : {listed}.", out),
        "es": (f"Ordena estas palabras alfabéticamente: {listed}.", out),
        "de": (f"Sortiere diese Wörter alphabetisch: {listed}.", out),
    }[lang] + (out,)


def reverse_words(lang: str, idx: tuple[int, ...]) -> tuple[str, str, str]:
    words = [NOUNS[lang][i] for i in idx]
    out = ", ".join(reversed(words))
    listed = ", ".join(words)
    return {
        "en": (f"Write these words in reverse order: {listed}.", out),
        "fr": (f"Écris ces mots dans l'ordre inverse : {listed}.", out),
        "es": (f"Escribe estas palabras en orden inverso: {listed}.", out),
        "de": (f"Schreibe diese Wörter in umgekehrter Reihenfolge: {listed}.", out),
    }[lang] + (out,)


def repeat_word(lang: str, i: int, times: int) -> tuple[str, str, str]:
    word, n = NOUNS[lang][i], NUMBER_WORDS[lang][times]
    out = " ".join([word] * times)
    return {
        "en": (f'Repeat the word "{word}" {n} times.', out),
        "fr": (f"Répète le mot « {word} » {n} fois.", out),
        "es": (f"Repite la palabra «{word}» {n} veces.", out),
        "de": (f"Wiederhole das Wort „{word}“ {n} Mal.", out),
    }[lang] + (out,)


def upper(lang: str, i: int) -> tuple[str, str, str]:
    s = SENTENCES[i][lang]
    return {
        "en": (f"Write this sentence in capital letters: {s}", s.upper()),
        "fr": (f"Écris cette phrase en majuscules : {s}", s.upper()),
        "es": (f"Escribe esta frase en mayúsculas: {s}", s.upper()),
        "de": (f"Schreibe diesen Satz in Großbuchstaben: {s}", s.upper()),
    }[lang] + (s.upper(),)


def count_words(lang: str, i: int) -> tuple[str, str, str]:
    s = SENTENCES[i][lang]
    n = len(s.split())
    return {
        "en": (f"How many words are in this sentence? {s}", f"The sentence has {n} words."),
        "fr": (f"Combien de mots y a-t-il dans cette phrase ? {s}", f"La phrase contient {n} mots."),
        "es": (f"¿Cuántas palabras tiene esta frase? {s}", f"La frase tiene {n} palabras."),
        "de": (f"Wie viele Wörter hat dieser Satz? {s}", f"Der Satz hat {n} Wörter."),
    }[lang] + (str(n),)


def last_word(lang: str, i: int) -> tuple[str, str, str]:
    s = SENTENCES[i][lang]
    w = s.rstrip(".").split()[-1]
    return {
        "en": (f"What is the last word of this sentence? {s}", w),
        "fr": (f"Quel est le dernier mot de cette phrase ? {s}", w),
        "es": (f"¿Cuál es la última palabra de esta frase? {s}", w),
        "de": (f"Was ist das letzte Wort dieses Satzes? {s}", w),
    }[lang] + (w,)


def spell(lang: str, i: int) -> tuple[str, str, str]:
    word = NOUNS[lang][i]
    out = "-".join(word)
    return {
        "en": (f'Spell the word "{word}" letter by letter.', out),
        "fr": (f"Épelle le mot « {word} » lettre par lettre.", out),
        "es": (f"Deletrea la palabra «{word}» letra por letra.", out),
        "de": (f"Buchstabiere das Wort „{word}“.", out),
    }[lang] + (out,)


# ---------------------------------------------------------------------------------------------
# items: (task, args) split into train and held-out
# ---------------------------------------------------------------------------------------------

QA = {"arithmetic": arithmetic, "larger": larger, "day": day, "month": month, "antonym": antonym, "colour": colour,
      "capital": capital, "number_word": number_word}
MANIP = {"sort": sort_words, "reverse": reverse_words, "repeat": repeat_word, "upper": upper, "count": count_words,
         "last_word": last_word, "spell": spell}
TEMPLATES = {**QA, **MANIP}


def qa_items(rng: random.Random) -> tuple[list, list]:
    # one ordering per pair (a > b), so a held-out "7 plus 12" is never trained as "12 plus 7"
    pairs = sorted({(a, b) for a in range(2, 21) for b in range(1, 13) if a > b})
    rng.shuffle(pairs)
    arith, facts = [], set()
    for k, (a, b) in enumerate(pairs):
        op = "-" if k % 2 else "+"
        fact = (op, frozenset({a, b, a + b if op == "+" else a - b}))  # "6 minus 1" and "6 minus 5" share it
        if fact not in facts:
            facts.add(fact)
            arith.append(("arithmetic", (a, b, op)))
    big_pairs = sorted({(a, b) for a in range(1, 100, 3) for b in range(2, 100, 7) if a != b})
    rng.shuffle(big_pairs)
    bigger = [("larger", p) for p in big_pairs]
    days = [("day", (i, after)) for i in range(7) for after in (True, False)]
    months = [("month", (i, after)) for i in range(12) for after in (True, False)]
    ants = [("antonym", (i, flip)) for i in range(len(ANTONYMS)) for flip in (False, True)]
    cols = [("colour", (i,)) for i in range(len(COLOURS))]
    caps = [("capital", (i,)) for i in range(len(CAPITALS))]
    nums = [("number_word", (n,)) for n in range(21)]
    # held-out: whole facts. An antonym pair in both directions; a pair of neighbouring days or
    # months in both directions ("after Wednesday" and "before Thursday" are the same fact).
    held_day_pairs, held_month_pairs = {(2, 3), (5, 6)}, {(1, 2), (6, 7), (10, 11)}

    def neighbours(i: int, after: bool, n: int) -> tuple[int, int]:
        return (i, (i + 1) % n) if after else ((i - 1) % n, i)
    held_ants = set(rng.sample(range(len(ANTONYMS)), 7))
    held_cols = set(rng.sample(range(len(COLOURS)), 4))
    held_caps = set(rng.sample(range(len(CAPITALS)), 6))
    held_nums = set(rng.sample(range(21), 6))

    def split(items, held_of):
        train = [it for it in items if not held_of(it[1])]
        held = [it for it in items if held_of(it[1])]
        return train, held

    parts = [
        (arith[:50], arith[50:80]),
        (bigger[:30], bigger[30:45]),
        split(days, lambda a: neighbours(a[0], a[1], 7) in held_day_pairs),
        split(months, lambda a: neighbours(a[0], a[1], 12) in held_month_pairs),
        split(ants, lambda a: a[0] in held_ants),
        split(cols, lambda a: a[0] in held_cols),
        split(caps, lambda a: a[0] in held_caps),
        split(nums, lambda a: a[0] in held_nums),
    ]
    return [t for tr, _ in parts for t in tr], [h for _, h in parts for h in h]


def manip_items(rng: random.Random) -> tuple[list, list]:
    nouns = list(range(len(NOUNS["en"])))
    held_nouns = set(rng.sample(nouns, 6))
    train_nouns = [n for n in nouns if n not in held_nouns]
    sents = list(range(len(SENTENCES)))
    held_sents = set(rng.sample(sents, 4))
    train_sents = [s for s in sents if s not in held_sents]

    def groups(pool: list[int], count: int) -> list[tuple[int, ...]]:
        return [tuple(rng.sample(pool, rng.choice((3, 4)))) for _ in range(count)]

    train = (
        [("sort", (g,)) for g in groups(train_nouns, 40)]
        + [("reverse", (g,)) for g in groups(train_nouns, 40)]
        + [("repeat", (n, t)) for n in train_nouns for t in (2, 3)]
        + [("upper", (s,)) for s in train_sents]
        + [("count", (s,)) for s in train_sents]
        + [("last_word", (s,)) for s in train_sents]
        + [("spell", (n,)) for n in train_nouns]
    )
    held_pool = sorted(held_nouns)
    orders = sorted({tuple(rng.sample(held_pool, 3)) for _ in range(60)})
    rng.shuffle(orders)
    held = (
        [("sort", (o,)) for o in orders[:5]]
        + [("reverse", (o,)) for o in orders[5:10]]
        + [("spell", (n,)) for n in held_pool]
        + [("repeat", (n, t)) for n in held_pool for t in (2, 3)]
    )
    return train, held


def render(task: str, args: tuple, lang: str) -> tuple[str, str, str]:
    return TEMPLATES[task](lang, *args)


def training_sets(rng: random.Random, qa_train: list, manip_train: list) -> dict[str, list[dict]]:
    en = rng.sample(qa_train, len(qa_train))
    out: dict[str, list[dict]] = {"en_tasks": [], "similar": [], "similar_en": [], "dissimilar": [], "dissimilar_en": []}
    for k, (task, args) in enumerate(en):
        prompt, answer, _ = render(task, args, "en")
        out["en_tasks"].append({"id": f"en-{k:03d}", "task": task, "instruction": prompt, "input": "", "output": answer})
    for name, pool in (("similar", qa_train), ("dissimilar", manip_train)):
        for j, lang in enumerate(LANGS):
            for k, (task, args) in enumerate(rng.sample(pool, 66)):
                ident = f"{name[:3]}-{lang}-{k:03d}"
                prompt, answer, _ = render(task, args, lang)
                out[name].append({"id": ident, "task": task, "lang": lang, "instruction": prompt, "input": "", "output": answer})
                prompt, answer, _ = render(task, args, "en")
                out[f"{name}_en"].append({"id": ident, "task": task, "lang": "en", "instruction": prompt, "input": "", "output": answer})
    return out


def _answer_in_prompt(prompt: str, reference: str) -> bool:
    """Free answers are scored by `contains`; an item whose reference is already in its prompt
    ("Which number is larger, 30 or 91?", an already sorted list) would score an echo as right."""
    from cft_adapters.metrics import contains_answer

    return contains_answer(prompt, reference) == 1.0


def eval_sets(rng: random.Random, qa_held: list, manip_held: list) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"en_mc": [], "en_qa": []}
    for k, (task, args) in enumerate(qa_held):
        prompt, _, reference = render(task, args, "en")
        if not _answer_in_prompt(prompt, reference):
            out["en_qa"].append({"id": f"qa-{k:03d}", "task": task, "prompt": prompt, "reference": reference})
        choices = sorted(_distractors(task, args, reference, rng) | {reference}, key=_fold)
        out["en_mc"].append({"id": f"mc-{k:03d}", "task": task, "question": prompt, "choices": choices,
                             "answer": choices.index(reference)})
    # Multilingual: only items whose reference is a word of the target language (no digits), from
    # both families (34 QA, 28 manipulation), so neither phase-2 condition is trained on the whole
    # evaluation format.
    language_specific = [it for it in qa_held if it[0] in {"day", "month", "antonym", "colour", "number_word"}]
    for lang in LANGS:
        rows = []
        for k, (task, args) in enumerate(language_specific + manip_held):
            prompt, _, reference = render(task, args, lang)
            if _answer_in_prompt(prompt, reference):
                continue
            rows.append({"id": f"{lang}-{k:03d}", "task": task, "family": "qa" if task in QA else "manip",
                         "language": lang, "prompt": prompt, "reference": reference})
        out[f"ml_{lang}"] = rows
    # Mixed order, so that an evaluation `limit` (the first N rows) still covers every task type.
    for rows in out.values():
        rng.shuffle(rows)
    return out


def _distractors(task: str, args: tuple, reference: str, rng: random.Random) -> set[str]:
    if reference.isdigit():
        value = int(reference)
        pool = {str(value + d) for d in (-3, -2, -1, 1, 2, 3, 10) if value + d >= 0}
        if task == "larger":
            pool = {str(min(args))} | {str(value + d) for d in (1, 2, 10)}
    elif task == "day":
        pool = set(DAYS["en"])
    elif task == "month":
        pool = set(MONTHS["en"])
    elif task == "antonym":
        pool = {w for pair in ANTONYMS for w in pair[0]}
    elif task == "colour":
        pool = set(COLOUR_WORDS["en"])
    elif task == "capital":
        pool = {c["en"][1] for c in CAPITALS}
    else:
        pool = set(NUMBER_WORDS["en"])
    pool.discard(reference)
    return set(rng.sample(sorted(pool), 3))


def build() -> dict[Path, str]:
    rng = random.Random(20241021)  # the paper's arXiv month
    qa_train, qa_held = qa_items(rng)
    manip_train, manip_held = manip_items(rng)
    files: dict[Path, str] = {}
    for name, rows in training_sets(rng, qa_train, manip_train).items():
        files[TRAIN_DIR / f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    for name, rows in eval_sets(rng, qa_held, manip_held).items():
        files[EVAL_DIR / f"{name}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the bundled files instead of writing")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
        if stale:
            print("out of date (run python benchmarks/mini_study/make_data.py): " + ", ".join(stale), file=sys.stderr)
            return 1
        print(f"{len(files)} files up to date")
        return 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {text.count(chr(10))} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
